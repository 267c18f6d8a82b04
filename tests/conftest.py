"""Test-wide settings: no network, no W&B, deterministic and light on the 2-core CI machine."""

from __future__ import annotations

import os

# Set before anything imports wandb or Lightning: tests never talk to a server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PL_DISABLE_FORK", "1")

from pathlib import Path

import pytest
import torch

# One intra-op thread keeps numerics reproducible (the golden vectors were recorded single-threaded)
# and avoids oversubscription when DataLoader workers run beside the main process.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _wandb_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI only sets WANDB_MODE when it is unset; a test that clears it must not reach a server.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic VOC-format dataset (``cli_helpers.GEN``), generated once per session."""
    from cli_helpers import GEN

    from datamodules import generate_synthetic_voc

    root = tmp_path_factory.mktemp("syn") / "voc"
    generate_synthetic_voc(root, **GEN)
    return root


@pytest.fixture(scope="session")
def stage1_ckpt(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 2-step stage-1 demo fit through the real CLI (run folder ``s1``)."""
    from cli_helpers import STAGE1, run_dir_args, tiny_data

    from fewshot_seg.cli import main

    out = tmp_path_factory.mktemp("stage1")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    try:
        cli = main(
            [
                "fit",
                *STAGE1,
                *tiny_data(synthetic_root),
                *run_dir_args(out, "s1"),
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                "--model.init_args.loss.num_points=256",
            ]
        )
    finally:
        mp.undo()
    assert cli.trainer.global_step == 2
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert last.name == "last.ckpt" and last.is_file()
    return last


@pytest.fixture(scope="session")
def stage2_ckpt(synthetic_root: Path, stage1_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 1-step stage-2 demo fit on ``stage1_ckpt`` (real CLI, run folder ``s2``)."""
    from cli_helpers import STAGE2, run_dir_args, tiny_data

    from fewshot_seg.cli import main

    out = tmp_path_factory.mktemp("stage2")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    try:
        cli = main(
            [
                "fit",
                *STAGE2,
                *tiny_data(synthetic_root),
                *run_dir_args(out, "s2"),
                f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
                "--trainer.max_steps=1",
                "--trainer.val_check_interval=1",
            ]
        )
    finally:
        mp.undo()
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests are skipped, with the reason, where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
