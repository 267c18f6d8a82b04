"""Train and test one fold end to end: stage 1 (POS) -> stage 2 (MM, from stage 1's best) -> test.

    python -m fewshot_seg.tools.train_fold --dataset synthetic --fold 0          # what `make train-fold` runs
    python -m fewshot_seg.tools.train_fold --dataset pascal --data-root data/VOCdevkit/VOC2012 --fold 1 \
        -- --trainer.devices=1                                                  # extra CLI args after --

Each stage is one ``fewshot-seg`` run (a subprocess, so the command lines printed here can be re-run by
hand) in its own folder under ``--run-dir``. The last line printed is the path of ``<run-dir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from fewshot_seg import config_dir
from fewshot_seg.lightning.results import format_class_table

# dataset -> (data config, stage-1 config, stage-2 config, (stage-1 steps, stage-2 steps) or None = YAML's)
DATASETS: dict[str, tuple[str, str, str, tuple[int, int] | None]] = {
    "synthetic": ("data_synthetic.yaml", "stage1_pos_cpu_demo.yaml", "stage2_mm_cpu_demo.yaml", None),
    "pascal": ("data_pascal.yaml", "stage1_pos.yaml", "stage2_mm.yaml", (20_000, 10_000)),
    "coco": ("data_coco.yaml", "stage1_pos.yaml", "stage2_mm.yaml", (60_000, 20_000)),  # SPEC §4
}


def _config_args(config_dir: Path, *names: str) -> list[str]:
    args = []
    for name in names:
        path = config_dir / name
        if not path.is_file():
            raise SystemExit(f"config {path} not found: pass --config-dir <folder holding {name}>")
        args += ["-c", str(path)]
    return args


def _run(cmd: list[str]) -> None:
    print("\n$ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise SystemExit(f"stage failed with exit code {done.returncode}: {shlex.join(cmd)}")


def _find(folder: Path, pattern: str) -> Path | None:
    """The newest file under ``folder`` matching ``pattern`` (recursive), or None."""
    hits = sorted(folder.glob(f"**/{pattern}"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def best_checkpoint(folder: Path) -> Path:
    """The stage's best checkpoint (by its validation metric), else its last one."""
    found = _find(folder, "checkpoints/best-*.ckpt") or _find(folder, "checkpoints/last.ckpt")
    if found is None:
        raise SystemExit(f"no checkpoint was written under {folder}")
    return found


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--data-root", default=None, help="dataset root (default: the data YAML's)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<dataset>/fold<fold>")
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
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra fewshot-seg arguments")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    run_dir = args.run_dir or Path("runs") / args.dataset / f"fold{args.fold}"
    data_cfg, stage1_cfg, stage2_cfg, steps = DATASETS[args.dataset]
    use_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    trainer_cfgs = ["trainer.yaml"] + (["trainer_gpu.yaml"] if use_gpu else [])
    data_args = [f"--data.init_args.fold={args.fold}", f"--data.init_args.shot={args.shot}"]
    if args.data_root:
        data_args.append(f"--data.init_args.root={args.data_root}")
    cli = [sys.executable, "-m", "fewshot_seg.cli"]

    def stage_args(cfg: str, folder: Path, max_steps: int | None) -> list[str]:
        out = _config_args(args.config_dir, *trainer_cfgs, data_cfg, cfg) + data_args
        out += [f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}"]
        if max_steps is not None:
            out.append(f"--trainer.max_steps={max_steps}")
        return out + extra

    start = time.perf_counter()
    _run([*cli, "fit", *stage_args(stage1_cfg, run_dir / "stage1", steps and steps[0])])
    stage1_ckpt = best_checkpoint(run_dir / "stage1")

    stage2 = [f"--model.init_args.stage1_checkpoint={stage1_ckpt}"]
    _run([*cli, "fit", *stage_args(stage2_cfg, run_dir / "stage2", steps and steps[1]), *stage2])
    stage2_ckpt = best_checkpoint(run_dir / "stage2")

    test_dir = run_dir / "test"
    _run([*cli, "test", *stage_args(stage2_cfg, test_dir, None), *stage2, f"--ckpt_path={stage2_ckpt}"])
    results_path = _find(test_dir, "results.json")
    if results_path is None:
        raise SystemExit(f"the test run wrote no results.json under {test_dir}")

    summary = json.loads(results_path.read_text())
    summary["test_wall_time_s"] = summary.get("wall_time_s")
    summary["wall_time_s"] = time.perf_counter() - start  # the whole fold: both fits and the test
    summary["stage1_checkpoint"] = str(stage1_ckpt)
    summary["stage2_checkpoint"] = str(stage2_ckpt)
    out = run_dir / "results.json"
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print("\n" + format_class_table(summary))
    print(out)
    return out


if __name__ == "__main__":
    main()
