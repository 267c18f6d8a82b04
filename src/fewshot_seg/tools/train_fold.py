"""Train and test one fold end to end: stage 1 (POS) -> per shot: stage 2 (MM) -> test -> fold summary.

    python -m fewshot_seg.tools.train_fold --dataset synthetic --fold 0     # what `make train-fold` runs
    python -m fewshot_seg.tools.train_fold --dataset pascal --data-root data/VOCdevkit/VOC2012 --fold 1 \\
        --shots 1 5 --devices 4 -- --trainer.precision=bf16-mixed        # extra CLI args after --

One stage-1 model serves every shot; stage 2 is trained per shot, as the reference does. Each stage is one
``fewshot-seg`` run (a subprocess, so the printed command lines can be re-run by hand) in a fixed folder
``<run-dir>/fewshot-seg/<dataset>-fold<F>-seed<S>-<stage>/``. Running the same command again continues
where it stopped: a finished stage (``done.json`` beside its checkpoints) is skipped (and said to be),
an unfinished one resumes from its newest usable checkpoint. The arguments that shape the results
(dataset, fold, seed, data root, GPU or not, the extra arguments and the config files' contents) are
recorded in ``<run-dir>/train_fold.json``; a re-run with other ones is refused (exit 2) unless
``--force``, which moves the earlier run into ``<run-dir>/replaced-<time>/`` and starts the fold over.
Each shot ends with ``<run-dir>/summary-<K>shot.json``, the one fold summary ``aggregate`` reads; the last
line printed is its path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from fewshot_seg import config_dir
from fewshot_seg.checkpoints import usable_checkpoints
from fewshot_seg.lightning.results import format_class_table
from fewshot_seg.tools.aggregate import SUMMARY_KIND, summary_name

# dataset -> (data config, stage-1 config, stage-2 config, (stage-1 steps, stage-2 steps) or None = YAML's)
DATASETS: dict[str, tuple[str, str, str, tuple[int, int] | None]] = {
    "synthetic": ("data_synthetic.yaml", "stage1_pos_cpu_demo.yaml", "stage2_mm_cpu_demo.yaml", None),
    "pascal": ("data_pascal.yaml", "stage1_pos.yaml", "stage2_mm.yaml", (20_000, 10_000)),
    "coco": ("data_coco.yaml", "stage1_pos.yaml", "stage2_mm.yaml", (60_000, 20_000)),  # SPEC §4
    # Benchmarks that train (docs/benchmarks.md); the paper gives no schedule: the stage files' (Pascal's).
    "fss1000": ("data_fss1000.yaml", "stage1_pos.yaml", "stage2_mm.yaml", None),
    "lvis92i": ("data_lvis92i.yaml", "stage1_pos.yaml", "stage2_mm.yaml", None),
    # A user's own data (docs/data.md#train-on-your-own-data): paths and class split in a copy of the YAML.
    "coco_format": ("data_coco_format.yaml", "stage1_pos.yaml", "stage2_mm.yaml", None),
    "mask_folder": ("data_mask_folder.yaml", "stage1_pos.yaml", "stage2_mm.yaml", None),
}


def dataset_of(data_config: Path, config_dir: Path) -> str:
    """The ``DATASETS`` entry whose shipped data YAML names the same DataModule as ``data_config``."""

    def class_path(path: Path) -> str | None:
        cfg = yaml.safe_load(_config_file(path).read_text())
        data = cfg.get("data") if isinstance(cfg, dict) else None
        return data.get("class_path") if isinstance(data, dict) else None

    wanted = class_path(data_config)
    for name, (data_cfg, *_) in DATASETS.items():
        if (config_dir / data_cfg).is_file() and class_path(config_dir / data_cfg) == wanted:
            return name
    raise SystemExit(
        f"--data-config {data_config}: its data.class_path {wanted!r} is no data YAML's of the datasets "
        f"{sorted(DATASETS)}: pass --dataset"
    )


def rank_zero() -> bool:
    """Whether this process is global rank 0: under SLURM or torchrun one copy of this driver may run per
    task, and only rank 0 writes its files (read when asked, so a launcher's environment always counts)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def logger_project(config_files: list[Path], extra: list[str] = ()) -> str:
    """The logger's ``project`` (W&B) or ``name``: the folder under the run dir holding the stage folders.

    Read as the CLI composes it: the trainer config files in order, then an override among ``extra``.
    """
    project = None
    for path in config_files:
        cfg = yaml.safe_load(_config_file(path).read_text())
        logger = (cfg or {}).get("trainer", {}).get("logger") if isinstance(cfg, dict) else None
        init = logger.get("init_args") or {} if isinstance(logger, dict) else {}
        project = init.get("project") or init.get("name") or project
    options = _options(list(extra))
    project = (
        options.get("--trainer.logger.init_args.project")
        or options.get("--trainer.logger.init_args.name")
        or project
    )
    if not project:
        raise SystemExit(
            f"no logger project in {', '.join(map(str, config_files))}: train_fold keeps each stage in "
            "<run-dir>/<project>/<stage>; set trainer.logger.init_args.project"
        )
    return str(project)


def shipped_project() -> str:
    """The logger project of the shipped ``trainer.yaml``."""
    return logger_project([config_dir() / "trainer.yaml"])


def _write(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed into place), from global rank 0 only."""
    if rank_zero():
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text)
        os.replace(tmp, path)


def _config_file(path: Path) -> Path:
    if not path.is_file():
        raise SystemExit(f"config {path} not found: pass --config-dir <folder holding {path.name}>")
    return path


def _config_args(folder: Path, *names: str) -> list[str]:
    return [arg for name in names for arg in ("-c", str(_config_file(folder / name)))]


RECORD = "train_fold.json"
"""The arguments a run folder was trained with (beside its summaries)."""


def _options(tokens: list[str]) -> dict[str, str]:
    """``--key=value`` / ``--key value`` tokens as a mapping (the last of a repeated key; others -> "")."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and "=" in tok:
            key, value = tok.split("=", 1)
        elif tok.startswith("-") and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
            key, value = tok, tokens[i + 1]
            i += 1
        else:
            key, value = tok, ""
        out[key] = value  # a repeated option: the last one counts, as on the command line
        i += 1
    return out


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, e.g. ``--trainer.max_steps: 2 -> 3``, ``fold: 0 -> 1``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "extra":
            ea, eb = _options(list(a or [])), _options(list(b or []))
            changed = [
                f"{opt}: {ea.get(opt, '(unset)')} -> {eb.get(opt, '(unset)')}"
                for opt in sorted(set(ea) | set(eb))
                if ea.get(opt) != eb.get(opt)
            ]
            out += changed or [f"extra arguments: {shlex.join(a or [])!r} -> {shlex.join(b or [])!r}"]
        elif key == "configs":
            ca, cb = dict(a or {}), dict(b or {})
            out += [f"config {n}: edited" for n in sorted(set(ca) | set(cb)) if ca.get(n) != cb.get(n)]
        else:
            out.append(f"{key}: {a} -> {b}")
    return out


def move_aside(run_dir: Path, project: str | None = None) -> Path:
    """Move what train_fold wrote in ``run_dir`` (stages under ``project``, summaries, record) into
    ``replaced-<time>/``; ``project`` defaults to the shipped trainer.yaml's."""
    project = project or shipped_project()
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 2
    while aside.exists():
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir(parents=True)
    for path in [run_dir / project, *sorted(run_dir.glob("summary-*shot.json")), run_dir / RECORD]:
        if path.exists():
            os.replace(path, aside / path.name)
    return aside


def _run(cmd: list[str]) -> None:
    print("\n$ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise SystemExit(f"stage failed with exit code {done.returncode}: {shlex.join(cmd)}")


class Stage:
    """One ``fewshot-seg`` run of the fold, in its fixed folder."""

    def __init__(self, run_dir: Path, tag: str, project: str | None = None) -> None:
        self.tag = tag
        self.folder = run_dir / (project or shipped_project()) / tag
        self.done_file = self.folder / "done.json"

    @property
    def done(self) -> dict | None:
        """The finished stage's record, or None while it is not finished.

        Raises:
            SystemExit: ``done.json`` exists but is not a record of this driver (named, never silently
                re-run: its stage may hold a finished model).
        """
        if not self.done_file.exists():
            return None
        try:
            record = json.loads(self.done_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            record, why = None, str(err)
        else:
            why = "no checkpoint recorded"
        if not isinstance(record, dict) or not isinstance(record.get("best"), str):
            print(
                f"error: {self.done_file} is unreadable ({why}): the stage's checkpoints are in "
                f"{self.folder / 'checkpoints'}; delete the file to train or resume the stage again",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return record

    def resume_args(self) -> list[str]:
        """``--ckpt_path=last`` when an earlier, interrupted run of this stage left a usable checkpoint.

        Not only ``last.ckpt``: a run killed while re-linking it may leave it dangling beside a newer
        best file, which a restart from step 0 would overwrite (``--ckpt_path last`` then takes the
        newest usable file).
        """
        return ["--ckpt_path=last"] if usable_checkpoints(self.folder / "checkpoints") else []

    def finish(self, best: Path) -> Path:
        """Mark the stage done (its best checkpoint recorded); returns that checkpoint."""
        _write(self.done_file, json.dumps({"best": str(best)}, indent=2) + "\n")
        return best


def best_checkpoint(stage: Stage) -> Path:
    """The stage's best checkpoint (by its validation metric), else its last one."""
    ckpts = stage.folder / "checkpoints"
    usable = usable_checkpoints(ckpts)  # newest first
    best = [p for p in usable if p.name.startswith("best-")]
    found = best[0] if best else next((p for p in usable if p.name == "last.ckpt"), None)
    if found is None:
        raise SystemExit(f"no checkpoint was written under {ckpts}")
    return found


def _check_record(run_dir: Path, record: dict, force: bool, project: str | None = None) -> None:
    """Refuse (exit 2) or with ``force`` move aside a run folder trained with other arguments."""
    path = run_dir / RECORD
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        previous = None
    changed = differences(previous, record) if isinstance(previous, dict) else []
    if changed:
        if not force:
            print(
                f"error: {run_dir} was trained with other arguments ({'; '.join(changed)}): pass --force to "
                f"start this fold over (the earlier run is moved into {run_dir}/replaced-<time>/), or use "
                "another --run-dir",
                file=sys.stderr,
            )
            raise SystemExit(2)
        if rank_zero():
            aside = move_aside(run_dir, project)
            print(f"--force: other arguments ({'; '.join(changed)}); the earlier run was moved into {aside}")
    if rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=None,
        help="the dataset (its data and stage YAMLs; default synthetic, or the one of --data-config)",
    )
    parser.add_argument(
        "--data-config",
        type=Path,
        default=None,
        help="a data YAML to use instead of the dataset's (e.g. your copy of data_coco_format.yaml)",
    )
    parser.add_argument(
        "--stage-configs",
        nargs=2,
        default=None,
        metavar=("STAGE1", "STAGE2"),
        help="stage YAMLs (names in --config-dir, or paths) instead of the dataset's, e.g. "
        "stage1_pos_cpu_demo.yaml stage2_mm_cpu_demo.yaml",
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[1], help="stage 2 + test per shot (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed: seed_everything and training episodes")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the data YAML's)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<dataset>/fold<F>/seed<S>")
    parser.add_argument("--devices", default=None, help="--trainer.devices (default: the trainer YAML's)")
    parser.add_argument("--nodes", default=None, help="--trainer.num_nodes (default: 1)")
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=config_dir(),
        help="folder of the YAML files (default: the shipped ones)",
    )
    parser.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add trainer_gpu.yaml (default: when CUDA is available)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"the run folder was trained with other arguments (its {RECORD}): move that run into "
        "<run-dir>/replaced-<time>/ and start the fold over (without it such a re-run is refused)",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra fewshot-seg arguments")
    args = parser.parse_args(argv)
    args.extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.dataset is None:
        args.dataset = dataset_of(args.data_config, args.config_dir) if args.data_config else "synthetic"
    args.run_dir = args.run_dir or Path("runs") / args.dataset / f"fold{args.fold}" / f"seed{args.seed}"
    return args


class FoldRun:
    """The stages of one (dataset, fold, seed) in one run folder, as ``fewshot-seg`` commands."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir: Path = args.run_dir
        self.data_cfg, self.stage1_cfg, self.stage2_cfg, self.steps = DATASETS[args.dataset]
        # A path joined to --config-dir stays that path: these may be files anywhere.
        if args.data_config is not None:
            self.data_cfg = str(args.data_config.resolve())
        if args.stage_configs is not None:
            self.stage1_cfg, self.stage2_cfg = (
                str(Path(c).resolve()) if Path(c).is_file() else c for c in args.stage_configs
            )
        self.use_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
        self.trainer_cfgs = ["trainer.yaml"] + (["trainer_gpu.yaml"] if self.use_gpu else [])
        self.project = logger_project([args.config_dir / n for n in self.trainer_cfgs], args.extra)
        self.name = f"{args.dataset}-fold{args.fold}-seed{args.seed}"
        self.cli = [sys.executable, "-m", "fewshot_seg.cli"]
        self.start = time.perf_counter()
        self.runs = 0  # stages and tests this invocation has run

    def stage(self, what: str) -> Stage:
        return Stage(self.run_dir, f"{self.name}-{what}", self.project)

    def record(self) -> dict:
        """What shapes the results, compared with the run folder's record on a re-run."""
        names = (*self.trainer_cfgs, self.data_cfg, self.stage1_cfg, self.stage2_cfg)
        files = [self.args.config_dir / n for n in names]
        return {
            "dataset": self.args.dataset,
            "fold": self.args.fold,
            "seed": self.args.seed,
            "data_root": self.args.data_root,
            "gpu": self.use_gpu,
            "extra": list(self.args.extra),
            "configs": {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files if p.is_file()
            },
        }

    def stage_args(self, cfg: str, stage: Stage, shot: int, max_steps: int | None) -> list[str]:
        """The ``fewshot-seg`` arguments of one stage: config files, this fold, its fixed folder, extras."""
        a = self.args
        out = _config_args(a.config_dir, *self.trainer_cfgs, self.data_cfg, cfg)
        out += [
            f"--data.init_args.fold={a.fold}",
            f"--seed_everything={a.seed}",
            f"--data.init_args.seed={a.seed}",
        ]
        out += [f"--data.init_args.root={a.data_root}"] if a.data_root else []
        out += [f"--trainer.devices={a.devices}"] if a.devices else []
        out += [f"--trainer.num_nodes={a.nodes}"] if a.nodes else []
        out += [
            f"--data.init_args.shot={shot}",
            f"--trainer.default_root_dir={self.run_dir}",
            f"--trainer.logger.init_args.save_dir={self.run_dir}",
            f"--trainer.logger.init_args.version={stage.tag}",
        ]
        out += [f"--trainer.max_steps={max_steps}"] if max_steps is not None else []
        return out + self.args.extra

    def stage1(self) -> Path:
        """Stage 1 (once for every shot): trained or resumed, or skipped when done; its best checkpoint."""
        stage = self.stage("stage1")
        if stage.done is not None:
            ckpt = Path(stage.done["best"])
            print(f"stage 1: done, skipped ({stage.done_file}; checkpoint {ckpt})", flush=True)
            return ckpt
        fit = self.stage_args(self.stage1_cfg, stage, self.args.shots[0], self.steps and self.steps[0])
        self._run([*self.cli, "fit", *fit, *stage.resume_args()])
        return stage.finish(best_checkpoint(stage))

    def _run(self, cmd: list[str]) -> None:
        self.runs += 1
        _run(cmd)

    def shot(self, shot: int, stage1_ckpt: Path) -> Path | None:
        """Stage 2 and the test at ``shot``, then the fold summary; its path (None off global rank 0)."""
        stage2 = self.stage(f"stage2-{shot}shot")
        runs = self.runs
        from_stage1 = [f"--model.init_args.stage1_checkpoint={stage1_ckpt}"]
        if stage2.done is None:
            fit = self.stage_args(self.stage2_cfg, stage2, shot, self.steps and self.steps[1])
            self._run([*self.cli, "fit", *fit, *from_stage1, *stage2.resume_args()])
            stage2_ckpt = stage2.finish(best_checkpoint(stage2))
        else:
            stage2_ckpt = Path(stage2.done["best"])
            print(f"stage 2, {shot}-shot: done, skipped ({stage2.done_file}; checkpoint {stage2_ckpt})")

        test = self.stage(f"test-{shot}shot")
        results = test.folder / "results.json"
        done2 = stage2.done_file.stat().st_mtime if stage2.done_file.exists() else float("inf")
        if not results.exists() or results.stat().st_mtime < done2:
            test_args = self.stage_args(self.stage2_cfg, test, shot, None)
            self._run([*self.cli, "test", *test_args, *from_stage1, f"--ckpt_path={stage2_ckpt}"])
        else:
            print(f"test, {shot}-shot: results up to date, skipped ({results})")
        if not rank_zero():
            return None  # global rank 0 summarises
        if not results.exists():
            raise SystemExit(f"the test run wrote no results.json under {test.folder}")
        return self.summarise(shot, results, stage1_ckpt, stage2_ckpt, ran=self.runs > runs)

    def summarise(self, shot: int, results: Path, stage1_ckpt: Path, stage2_ckpt: Path, ran: bool) -> Path:
        """Write ``<run-dir>/summary-<K>shot.json`` (what ``aggregate`` reads) and print its table.

        ``ran``: this invocation ran the shot's stage 2 or test (else its time is not the results').
        """
        summary = json.loads(results.read_text())
        out = self.run_dir / summary_name(shot)
        # The time of the invocation that ran the stages and the test; one that ran nothing (all done)
        # keeps the time its earlier summary of the same results recorded.
        earlier = None if ran else _earlier_wall_time(out, results)
        summary.update(
            kind=SUMMARY_KIND,
            seed=self.args.seed,
            test_wall_time_s=summary.get("wall_time_s"),
            wall_time_s=time.perf_counter() - self.start if earlier is None else earlier,
            stage1_checkpoint=str(stage1_ckpt),
            stage2_checkpoint=str(stage2_ckpt),
            test_results=str(results),
        )
        _write(out, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print("\n" + format_class_table(summary))
        print(out)
        return out


def _earlier_wall_time(summary: Path, results: Path) -> float | None:
    """``wall_time_s`` of an existing fold summary written from ``results`` as it is now, else None."""
    try:
        earlier = json.loads(summary.read_text())
        current = summary.stat().st_mtime >= results.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not (isinstance(earlier, dict) and current and earlier.get("test_results") == str(results)):
        return None
    wall = earlier.get("wall_time_s")
    return float(wall) if isinstance(wall, (int, float)) else None


def main(argv: list[str] | None = None) -> Path:
    """Train and test one fold (see the module docstring); returns the last fold summary's path."""
    fold = FoldRun(parse_args(argv))
    _check_record(fold.run_dir, fold.record(), fold.args.force, fold.project)
    stage1_ckpt = fold.stage1()
    out = fold.run_dir
    for shot in fold.args.shots:
        out = fold.shot(shot, stage1_ckpt) or out
    return out


if __name__ == "__main__":
    main()
