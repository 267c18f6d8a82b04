"""``fewshot-seg``: LightningCLI entry point (fit / validate / test / predict), and the model tools
(``segment``, ``serve``: ``fewshot_seg.tools``).

Model and data are chosen by class path (``--model POSModule|MMModule``, ``--data SyntheticDataModule``
...) or by the YAML files in ``lightning_configs/`` (composable, in any order: ``-c a.yaml -c b.yaml``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

# Imported so that short class names (--model MMModule, --data SyntheticDataModule) resolve.
import datamodules
import fewshot_seg.lightning  # noqa: F401
from fewshot_seg import config_dir
from fewshot_seg.checkpoints import (
    STAGE_CLASS,
    CheckpointError,
    checkpoint_stage,
    read_checkpoint,
    require_lightning_checkpoint,
    usable_checkpoints,
)
from fewshot_seg.lightning.callbacks import BestCheckpoint
from fewshot_seg.lightning.finite import NonFiniteError
from fewshot_seg.lightning.prediction import PredictionWriter
from fewshot_seg.lightning.results import run_dir
from fewshot_seg.lightning.runlock import ReleaseOnException, RunFolderError, claim_run_folder
from fewshot_seg.outputs import OutputError
from fewshot_seg.parse_errors import ConfigError, build_error, check_config_files, explain

DESCRIPTION = f"""\
fewshot-seg: MM-Former few-shot segmentation (train, evaluate, predict) with LightningCLI.

Start from the YAML files shipped in {config_dir()} (also `lightning_configs/` in a checkout):
one trainer file, one data file and one stage file, in any order, e.g.

  fewshot-seg fit -c lightning_configs/trainer.yaml -c lightning_configs/data_synthetic.yaml \\
                  -c lightning_configs/stage1_pos_cpu_demo.yaml

then override any value: --data.init_args.fold=1, --model.init_args.optim.lr=3e-4, ...
`fewshot-seg fit --model.help MMModule` / `--data.help Pascal5iDataModule` list a class's options.
Paths (configs, data roots, checkpoints, run folders) are relative to the working directory.

To use a trained stage-2 model on your own images (see `fewshot-seg segment --help`, `serve --help`):
  fewshot-seg segment --ckpt stage2.ckpt --support a.jpg a_mask.png --queries photos/ --out masks/
  fewshot-seg serve --ckpt stage2.ckpt            # a local page: paint a support, segment queries
"""

TOOLS = {"segment": "fewshot_seg.tools.segment", "serve": "fewshot_seg.tools.serve"}
"""Subcommands that are no LightningCLI run: plain argparse tools over a trained model."""


def _quiet_known_warnings() -> None:
    """Silence third-party warnings that say nothing about the user's run, each by message and module."""
    rules = [
        # torch's pytree deprecation, raised inside Lightning's utilities on every run.
        (r".*LeafSpec.*", FutureWarning, r"(torch|lightning_utilities|pytorch_lightning).*"),
        (r".*LeafSpec.*", DeprecationWarning, r"(torch|lightning_utilities|pytorch_lightning).*"),
        # Lightning counts the deliberately frozen backbone/POS (eval mode) as "modules in eval mode".
        (r"Found \d+ module\(s\) in eval mode", UserWarning, r"pytorch_lightning.*"),
        # The model normalises its uint8 input batches itself (EpisodeModule.on_after_batch_transfer):
        # Lightning says so whenever a DataModule is used too.
        (
            r"You have overridden `on_after_batch_transfer` in `LightningModule`",
            UserWarning,
            r"pytorch_lightning.*",
        ),
    ]
    for message, category, module in rules:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # An advertisement Lightning logs at INFO on every Trainer construction.
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropTip) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropTip())


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


class RunDirSaveConfig(SaveConfigCallback):
    """Saves the resolved config into this run's folder (next to its checkpoints and results).

    The stock callback writes to ``Trainer.log_dir``, which for W&B is the bare ``save_dir`` that every
    run shares. An existing file is never overwritten (a resumed run keeps its first run's
    ``config.yaml`` and writes ``config-2.yaml``, ...).
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.config_filename
        n = 2
        while path.exists():
            path = folder / f"{Path(self.config_filename).stem}-{n}{Path(self.config_filename).suffix}"
            n += 1
        self.parser.save(self.config, str(path), skip_validation=True, multifile=self.multifile)
        self.saved_path = path


class FewShotCLI(LightningCLI):
    """LightningCLI with this project's conveniences.

    * A ``--ckpt_path`` checkpoint fixes the model's *architecture* (``architecture_hparams``: the
      backbone / POS / Mask Matching configurations its weights were trained with); every other
      hyper-parameter stays as the command line and config files say. (Stock LightningCLI re-applies
      all saved hyper-parameters over the command line.)
    * ``fit`` ends by printing the run folder and checkpoints; ``predict`` by printing where it wrote.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse; a mistake (unknown option or class, bad value, config file not YAML) is a ConfigError.

        The parser is built with ``exit_on_error=False``, so jsonargparse raises instead of printing the
        usage; :func:`~fewshot_seg.parse_errors.explain` makes its report one line with a "did you mean".
        """
        from jsonargparse import ArgumentError

        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        check_config_files(argv)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            sub = next((a for a in argv if a in getattr(self, "_subcommand_parsers", {})), None)
            target = self._subcommand_parsers[sub] if sub else parser
            options = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
            raise ConfigError(explain(str(err), options)) from None

    def _parse_ckpt_path(self) -> None:
        # A private LightningCLI method, overridden because no public hook replaces it: the stock one
        # re-applies *every* saved hyper-parameter over the command line (tests/test_cli.py checks the
        # pinned Lightning still calls it between parsing and instantiation).
        if not self.config.get("subcommand"):
            return
        cfg = self.config[self.config.subcommand]
        ckpt_path = cfg.get("ckpt_path")
        keyword = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).split(":")[0] == "registry"
        if not ckpt_path or keyword or "://" in str(ckpt_path):
            return  # Lightning's own keywords and remote (fsspec) paths
        ckpt = read_checkpoint(ckpt_path, "--ckpt_path")  # a missing file or a folder: one line
        require_lightning_checkpoint(ckpt, f"--ckpt_path {str(ckpt_path)!r}")  # not ImageNet weights
        hparams = ckpt.get("hyper_parameters") or {}
        model_cls = _model_class(cfg)
        stage = checkpoint_stage(ckpt) if "state_dict" in ckpt else None
        if model_cls is not None and stage and getattr(model_cls, "stage", stage) != stage:
            raise CheckpointError(
                f"--ckpt_path {ckpt_path!r} is a {STAGE_CLASS.get(stage, stage)} (stage {stage!r}) "
                f"checkpoint, but the config builds {model_cls.__name__}: use that stage's config file"
            )
        keys = getattr(model_cls, "architecture_hparams", ())
        recorded = {k: hparams[k] for k in keys if hparams.get(k) is not None}
        if recorded and model_cls is not None:
            model = {"class_path": f"{model_cls.__module__}.{model_cls.__name__}", "init_args": recorded}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = cfg.get("trainer") if cfg is not None else None
        if trainer is not None and trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            # --trainer.enable_progress_bar=false means no bar, also the one a config file adds.
            trainer.callbacks = [c for c in trainer.callbacks if not _configures(c, ProgressBar)]
        if self.subcommand == "predict" and cfg.get("return_predictions") is None:
            cfg.return_predictions = False  # PredictionWriter writes every batch; nothing is kept in memory
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = _resume_last(trainer, trainer.get("logger") if trainer is not None else None)

    def after_instantiate_classes(self) -> None:
        if self.subcommand is not None and hasattr(self.model, "run_config"):
            self._dump_config()  # the resolved config of this run, recorded in its checkpoints and results
            self.model.run_config = self.config_dump

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start over in a run folder that holds an earlier fit's checkpoints, deleting them "
            "(without it such a fit is refused; --ckpt_path last continues the earlier fit instead)",
        )

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("ckpt_path"):
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, BestCheckpoint):
                    callback.resuming = True
        folder = _known_run_folder(self.trainer)
        if folder is None:
            return
        # One fit per run folder; a fresh fit never writes over an earlier fit's checkpoints. Rank 0
        # decides; a refusal stops every rank with the same line.
        self._run_lock = claim_run_folder(
            self.trainer, folder, fresh=not cfg.get("ckpt_path"), overwrite=bool(cfg.get("overwrite"))
        )
        if self._run_lock is not None:
            self.trainer.callbacks.append(ReleaseOnException(self._run_lock))

    def after_fit(self) -> None:
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()
        if not self.trainer.is_global_zero:
            return
        folder = run_dir(self.trainer)
        ckpt = self.trainer.checkpoint_callback
        print(f"run folder: {folder}")
        if ckpt is not None:
            if getattr(ckpt, "best_model_path", ""):
                print(f"best checkpoint: {ckpt.best_model_path}")
            if getattr(ckpt, "last_model_path", ""):
                print(f"last checkpoint: {ckpt.last_model_path}")

    def after_predict(self) -> None:
        if not self.trainer.is_global_zero:
            return
        writers = [c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)]
        if writers and writers[0].folder is not None:
            print(f"predictions written to {writers[0].folder}")
        skipped = getattr(self.datamodule, "unsupported", [])
        if skipped:
            print(f"{len(skipped)} file(s) skipped, not an image format PIL reads: {', '.join(skipped)}")
        failed = getattr(self.datamodule, "failed", [])
        if failed:
            lines = "\n".join(f"  {path}: {why}" for path, why in failed)
            print(f"{len(failed)} quer{'y' if len(failed) == 1 else 'ies'} could not be predicted:\n{lines}")
            raise SystemExit(1)


def _resume_last(trainer: Any, logger: Any) -> str:
    """``--ckpt_path last``: the newest usable checkpoint of the run to continue, whose version is reused.

    Lightning looks for ``last.ckpt`` in the folder of the *new* run, which for W&B (a fresh random id per
    run) never holds one, and then trains from scratch. Here the run is the logger's given ``version``
    or, without one, the most recently written run under the logger's ``save_dir/<project or name>``; its
    version is set on the logger, so the fit continues in the same folder (and the same W&B run). The
    checkpoint is ``last.ckpt``, or where that is missing, dangling or unreadable (a run killed while
    updating it) the newest loadable checkpoint beside it (``usable_checkpoints``).

    Raises:
        CheckpointError: no usable checkpoint to resume from (the message names where it looked).
    """
    entries = logger if isinstance(logger, list) else [logger]
    entry = entries[0] if entries and entries[0] not in (None, False, True) else None
    if entry is None:  # no logger: checkpoints live in default_root_dir/checkpoints
        folder = Path(trainer.get("default_root_dir") or ".") / "checkpoints"
        found = usable_checkpoints(folder)
        if not found:
            raise CheckpointError(f"--ckpt_path last: no checkpoint under {folder} to resume from")
        return _resuming(folder.parent, found[0])
    args = entry.init_args
    wandb = "Wandb" in str(entry.class_path)
    name = (args.get("project") if wandb else args.get("name")) or "lightning_logs"
    base = Path(args.get("save_dir") or trainer.get("default_root_dir") or ".") / str(name)
    version = args.get("version") or (args.get("id") if wandb else None)
    if version is not None:
        found = usable_checkpoints(base / str(version) / "checkpoints")
        if not found:
            raise CheckpointError(
                f"--ckpt_path last: run {base / str(version)} has no checkpoint to resume from"
            )
        path = found[0]
    else:
        runs = [c for c in (usable_checkpoints(d) for d in base.glob("*/checkpoints")) if c]
        if not runs:
            raise CheckpointError(
                f"--ckpt_path last: no run under {base} has a checkpoints/last.ckpt to resume from; "
                "start the fit without --ckpt_path"
            )
        path = max(runs, key=lambda c: c[0].stat().st_mtime)[0]
        args.version = path.parent.parent.name
    return _resuming(path.parent.parent, path)


def _resuming(run: Path, path: Path) -> str:
    why = (
        ""
        if path.name == "last.ckpt"
        else " (last.ckpt is missing or unreadable: the newest usable checkpoint)"
    )
    print(f"resuming run {run} from {path}{why}", file=sys.stderr)
    return str(path)


def _known_run_folder(trainer: Trainer) -> Path | None:
    """The run folder of a fit, or None where the logger picks a fresh one (W&B without a run id)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    loggers = trainer.loggers
    if loggers and not isinstance(loggers[0], (CSVLogger, TensorBoardLogger)) and loggers[0].version is None:
        return None
    return run_dir(trainer)


def _model_class(cfg: Any) -> type | None:
    model = cfg.get("model") if cfg is not None else None
    path = getattr(model, "class_path", None) or (
        model.get("class_path") if isinstance(model, dict) else None
    )
    if not path:
        return None
    return _import_class(str(path))


def _import_class(path: str) -> type:
    """The class a config's ``class_path`` names (the parser has already resolved it, so it imports)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _configures(entry: Any, base: type) -> bool:
    """Whether a ``{class_path, init_args}`` config entry builds a ``base`` (by class, not by name)."""
    path = getattr(entry, "class_path", None) or (
        entry.get("class_path") if isinstance(entry, dict) else None
    )
    return bool(path) and issubclass(_import_class(str(path)), base)


def main(args: list[str] | None = None, run: bool = True) -> FewShotCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); returns the CLI object (tests)."""
    # Offline unless the environment chooses (WANDB_MODE=online/disabled); never fixed in YAML. A W&B
    # sweep agent's runs (WANDB_SWEEP_ID set) must report to the sweep, so they keep wandb's own default.
    if "WANDB_SWEEP_ID" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    _quiet_known_warnings()
    try:
        return _make_cli(args, run)
    finally:
        if run:
            _finish_wandb()


USER_ERRORS = (
    CheckpointError,
    datamodules.DatasetError,
    ConfigError,
    NonFiniteError,
    OutputError,
    RunFolderError,
)


def user_error(err: BaseException) -> BaseException | None:
    """The project's own error behind ``err`` (jsonargparse wraps errors raised while building classes)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        if (named := build_error(err)) is not None:
            return named
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def entry_point() -> None:
    """Console script ``fewshot-seg``: exit 0 on success; a user error prints one line and exits 2."""
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        tool = importlib.import_module(TOOLS[sys.argv[1]])
        raise SystemExit(tool.main(sys.argv[2:]))
    try:
        main()
    except Exception as err:
        mine = user_error(err)
        if mine is None:
            raise
        print(f"error: {mine}", file=sys.stderr)
        raise SystemExit(2) from None


def _finish_wandb() -> None:
    """Close the W&B run so that a next in-process run (tests, sweeps) gets its own run and folder."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _make_cli(args: list[str] | None, run: bool) -> FewShotCLI:
    return FewShotCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunDirSaveConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        parser_kwargs={
            "description": DESCRIPTION,
            "formatter_class": _raw_help_formatter(),
            "exit_on_error": False,  # parse errors become one-line ConfigErrors (parse_arguments)
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def _raw_help_formatter() -> type:
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the description's layout
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


if __name__ == "__main__":
    entry_point()
