"""Command-line pieces shared by the tests that drive the real CLI on tiny synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
# Generator arguments of the tiny synthetic dataset; every run on one root must use the same ones.
GEN = {"num_train": 120, "num_val": 60}


def cfg(*names: str) -> list[str]:
    """``-c lightning_configs/<name>`` for each name, in order (later files override earlier ones)."""
    out: list[str] = []
    for n in names:
        out += ["-c", str(CONFIGS / n)]
    return out


def tiny_data(root: Path) -> list[str]:
    """Data overrides: the tiny synthetic set at 64 px, batch 2, in-process loading, 4 eval episodes."""
    return [
        f"--data.init_args.root={root}",
        f"--data.init_args.num_train={GEN['num_train']}",
        f"--data.init_args.num_val={GEN['num_val']}",
        "--data.init_args.pool_min_pixels=50",
        "--data.init_args.image_size=64",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.val_episodes=4",
        "--data.init_args.test_episodes=4",
    ]


def run_dir_args(out: Path, version: str | None = None) -> list[str]:
    """Send checkpoints and logs under ``out`` (optionally a fixed logger version = run folder)."""
    args = [
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_model_summary=false",
    ]
    if version:
        args.append(f"--trainer.logger.init_args.version={version}")
    return args


STAGE1 = cfg("trainer.yaml", "data_synthetic.yaml", "stage1_pos_cpu_demo.yaml")
STAGE2 = cfg("trainer.yaml", "data_synthetic.yaml", "stage2_mm_cpu_demo.yaml")

# Benchmark data files (docs/benchmarks.md), run end to end by test_benchmark_configs.py.
BENCHMARK_DATA = [
    "data_fss1000.yaml",
    "data_lvis92i.yaml",
    "data_coco2pascal.yaml",
    "data_deepglobe.yaml",
    "data_isic2018.yaml",
    "data_chestxray.yaml",
]

# A user's own data (docs/data.md#train-on-your-own-data), run end to end by test_own_data_cli.py.
OWN_DATA = ["data_coco_format.yaml", "data_mask_folder.yaml"]

# Backbone files (docs/model.md#backbones), composed after a stage file; the default suite runs each with
# a tiny model of the same family (the real ones are too large for a CPU test) and parses it as written.
BACKBONE_CONFIGS = {
    "backbone_resnet101.yaml": "resnet18",
    "backbone_convnext_base.yaml": "timm:convnext_atto",
    "backbone_swin_base.yaml": "timm:swin_tiny_patch4_window7_224",
    "backbone_dinov2_vitb14.yaml": "timm:vit_small_patch14_dinov2",
}


def run_two_processes(args: list[str], cwd: Path, pythonpath: Path | None = None) -> str:
    """``python -m fewshot_seg.cli <args>`` as a 2-process gloo run on the CPU (the caller adds the
    arguments that ask for 2 devices); fails unless it exited 0 as DDP. Returns its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if pythonpath is not None:  # e.g. the tests folder, for a recorder callback in a config
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "fewshot_seg.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout, "did not run as 2-process DDP"
    return proc.stdout
