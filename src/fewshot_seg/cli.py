"""``fewshot-seg``: LightningCLI entry point (fit / validate / test / predict).

Model and data are chosen by class path (``--model POSModule|MMModule``, ``--data SyntheticDataModule``
...) or by the YAML files in ``lightning_configs/`` (composable: ``-c a.yaml -c b.yaml``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

# Imported so that short class names (--model MMModule, --data SyntheticDataModule) resolve.
import datamodules  # noqa: F401
import fewshot_seg.lightning  # noqa: F401
from fewshot_seg.lightning.results import run_dir


def _wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


class RunDirSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` into this run's folder (next to its checkpoints and results).

    The stock callback writes to ``Trainer.log_dir``, which for W&B is the bare ``save_dir`` that
    every run shares.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            str(folder / self.config_filename),
            skip_none=False,
            overwrite=self.overwrite,
            multifile=self.multifile,
        )


class FewShotCLI(LightningCLI):
    """LightningCLI with a W&B -> CSV logger fallback when ``wandb`` is not installed."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger") if cfg is not None else None
        if _wandb_available() or logger is None:
            return
        entries = logger if isinstance(logger, list) else [logger]
        for entry in entries:
            if "WandbLogger" in str(getattr(entry, "class_path", "")):
                args = entry.init_args
                print("wandb is not installed: logging with CSVLogger instead", file=sys.stderr)
                entry.class_path = "pytorch_lightning.loggers.CSVLogger"
                entry.init_args = type(args)(
                    save_dir=args.get("save_dir") or "runs", name=args.get("project") or "fewshot-seg"
                )


def main(args: list[str] | None = None, run: bool = True) -> FewShotCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); returns the CLI object (tests)."""
    # Offline unless the environment chooses (WANDB_MODE=online/disabled); never fixed in YAML.
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        return _make_cli(args, run)
    finally:
        if run:
            _finish_wandb()


def entry_point() -> None:
    """Console script ``fewshot-seg``: returns nothing, so the shell sees exit status 0 on success."""
    main()


def _finish_wandb() -> None:
    """Close the W&B run so that a next in-process run (tests, sweeps) gets its own run and folder."""
    if not _wandb_available():
        return
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
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
