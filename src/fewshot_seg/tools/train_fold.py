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

from fewshot_seg import config_dir
from fewshot_seg.lightning.checkpoints import usable_checkpoints
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
}
PROJECT = "fewshot-seg"  # the W&B project / logger name of trainer.yaml
# Under SLURM or torchrun one copy of this driver may run per task; only global rank 0 writes its files.
RANK_ZERO = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _write(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed into place), from global rank 0 only."""
    if RANK_ZERO:
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text)
        os.replace(tmp, path)


def _config_args(folder: Path, *names: str) -> list[str]:
    args = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"config {path} not found: pass --config-dir <folder holding {name}>")
        args += ["-c", str(path)]
    return args


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


def move_aside(run_dir: Path) -> Path:
    """Move what train_fold wrote in ``run_dir`` (stages, summaries, record) into ``replaced-<time>/``."""
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 2
    while aside.exists():
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir(parents=True)
    for path in [run_dir / PROJECT, *sorted(run_dir.glob("summary-*shot.json")), run_dir / RECORD]:
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

    def __init__(self, run_dir: Path, tag: str) -> None:
        self.tag = tag
        self.folder = run_dir / PROJECT / tag
        self.done_file = self.folder / "done.json"

    @property
    def done(self) -> dict | None:
        try:
            return json.loads(self.done_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

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


def _check_record(run_dir: Path, record: dict, force: bool) -> None:
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
        if RANK_ZERO:
            aside = move_aside(run_dir)
            print(f"--force: other arguments ({'; '.join(changed)}); the earlier run was moved into {aside}")
    if RANK_ZERO:
        run_dir.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
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
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    run_dir = args.run_dir or Path("runs") / args.dataset / f"fold{args.fold}" / f"seed{args.seed}"
    data_cfg, stage1_cfg, stage2_cfg, steps = DATASETS[args.dataset]
    use_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    trainer_cfgs = ["trainer.yaml"] + (["trainer_gpu.yaml"] if use_gpu else [])
    common = [
        f"--data.init_args.fold={args.fold}",
        f"--seed_everything={args.seed}",
        f"--data.init_args.seed={args.seed}",
    ]
    if args.data_root:
        common.append(f"--data.init_args.root={args.data_root}")
    if args.devices:
        common.append(f"--trainer.devices={args.devices}")
    if args.nodes:
        common.append(f"--trainer.num_nodes={args.nodes}")
    cli = [sys.executable, "-m", "fewshot_seg.cli"]
    name = f"{args.dataset}-fold{args.fold}-seed{args.seed}"

    def stage_args(cfg: str, stage: Stage, shot: int, max_steps: int | None) -> list[str]:
        out = (
            _config_args(args.config_dir, *trainer_cfgs, data_cfg, cfg)
            + common
            + [f"--data.init_args.shot={shot}"]
        )
        out += [
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            f"--trainer.logger.init_args.version={stage.tag}",
        ]
        if max_steps is not None:
            out.append(f"--trainer.max_steps={max_steps}")
        return out + extra

    config_files = [args.config_dir / n for n in (*trainer_cfgs, data_cfg, stage1_cfg, stage2_cfg)]
    record = {
        "dataset": args.dataset,
        "fold": args.fold,
        "seed": args.seed,
        "data_root": args.data_root,
        "gpu": use_gpu,
        "extra": list(extra),
        "configs": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in config_files if p.is_file()
        },
    }
    _check_record(run_dir, record, args.force)

    start = time.perf_counter()
    stage1 = Stage(run_dir, f"{name}-stage1")
    if stage1.done is None:
        fit1 = stage_args(stage1_cfg, stage1, args.shots[0], steps and steps[0])
        _run([*cli, "fit", *fit1, *stage1.resume_args()])
        stage1_ckpt = stage1.finish(best_checkpoint(stage1))
    else:
        stage1_ckpt = Path(stage1.done["best"])
        print(f"stage 1: done, skipped ({stage1.done_file}; checkpoint {stage1_ckpt})", flush=True)

    out = run_dir
    for shot in args.shots:
        stage2 = Stage(run_dir, f"{name}-stage2-{shot}shot")
        from_stage1 = [f"--model.init_args.stage1_checkpoint={stage1_ckpt}"]
        if stage2.done is None:
            fit2 = stage_args(stage2_cfg, stage2, shot, steps and steps[1])
            _run([*cli, "fit", *fit2, *from_stage1, *stage2.resume_args()])
            stage2_ckpt = stage2.finish(best_checkpoint(stage2))
        else:
            stage2_ckpt = Path(stage2.done["best"])
            print(f"stage 2, {shot}-shot: done, skipped ({stage2.done_file}; checkpoint {stage2_ckpt})")

        test = Stage(run_dir, f"{name}-test-{shot}shot")
        results = test.folder / "results.json"
        done2 = stage2.done_file.stat().st_mtime if stage2.done_file.exists() else float("inf")
        if not results.exists() or results.stat().st_mtime < done2:
            test_args = stage_args(stage2_cfg, test, shot, None)
            _run([*cli, "test", *test_args, *from_stage1, f"--ckpt_path={stage2_ckpt}"])
        else:
            print(f"test, {shot}-shot: results up to date, skipped ({results})")
        if not RANK_ZERO:
            continue  # global rank 0 summarises
        if not results.exists():
            raise SystemExit(f"the test run wrote no results.json under {test.folder}")

        summary = json.loads(results.read_text())
        summary.update(
            kind=SUMMARY_KIND,
            seed=args.seed,
            test_wall_time_s=summary.get("wall_time_s"),
            wall_time_s=time.perf_counter() - start,  # this invocation: the stages it ran and the test
            stage1_checkpoint=str(stage1_ckpt),
            stage2_checkpoint=str(stage2_ckpt),
            test_results=str(results),
        )
        out = run_dir / summary_name(shot)
        _write(out, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print("\n" + format_class_table(summary))
        print(out)
    return out


if __name__ == "__main__":
    main()
