"""Exact resume through the real CLI: a fit stopped after N steps, resumed to 2N, equals a 2N fit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import STAGE1, tiny_data

from fewshot_seg.checkpoints import CheckpointError
from fewshot_seg.cli import main

N = 3


def _fit(root: Path, out: Path, workers: int, steps: int, *extra: str):
    return main(
        [
            "fit",
            *STAGE1,
            *tiny_data(root),
            f"--data.init_args.num_workers={workers}",
            "--model.init_args.loss.num_points=256",
            f"--trainer.max_steps={steps}",
            f"--model.init_args.optim.max_steps={2 * N}",  # the schedule of the whole run, as after a crash
            f"--trainer.val_check_interval={N}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",  # the default (W&B) logger, no run id given
            "--trainer.enable_model_summary=false",
            *extra,
        ]
    )


def _weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(synthetic_root: Path, tmp_path: Path, workers: int) -> None:
    whole = _weights(_fit(synthetic_root, tmp_path / "whole", workers, 2 * N))

    first = _fit(synthetic_root, tmp_path / "split", workers, N)
    run = Path(first.trainer.checkpoint_callback.last_model_path).parent.parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(synthetic_root, tmp_path / "split", workers, 2 * N, "--ckpt_path=last")
    # Its own earlier checkpoints in the folder are expected: no "exists and is not empty" warning.
    not_empty = [str(w.message) for w in caught if "not empty" in str(w.message)]
    assert not not_empty, not_empty
    assert resumed.trainer.global_step == 2 * N
    # The same run continued: one run folder, its first config kept beside the resumed run's.
    assert Path(resumed.trainer.checkpoint_callback.last_model_path).parent.parent == run
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config-2.yaml", "config.yaml"]
    after = _weights(resumed)
    assert after.keys() == whole.keys()
    different = [k for k in whole if not torch.equal(whole[k], after[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_resume_without_a_run_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no run under .* has a checkpoints/last\.ckpt"):
        _fit(synthetic_root, tmp_path, 0, N, "--ckpt_path=last")


def test_resume_with_a_dangling_last_takes_the_newest_valid_checkpoint(
    synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    first = _fit(synthetic_root, tmp_path, 0, N)
    ckpts = Path(first.trainer.checkpoint_callback.last_model_path).parent
    best = ckpts / f"best-step{N}.ckpt"
    assert best.is_file()
    # A kill between deleting the old best and re-linking left last.ckpt pointing at nothing.
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").symlink_to(f"best-step{2 * N + 1}.ckpt")
    (ckpts / f"best-step{N - 1}.ckpt").write_bytes(b"PK\x03\x04 truncated")  # newer, but not a checkpoint
    resumed = _fit(synthetic_root, tmp_path, 0, 2 * N, "--ckpt_path=last")
    assert resumed.trainer.global_step == 2 * N
    err = capsys.readouterr().err
    assert f"from {best}" in err and "last.ckpt is missing or unreadable" in err


def _console(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    import sys

    from fewshot_seg import cli

    monkeypatch.setattr(sys, "argv", ["fewshot-seg", *args])
    try:
        cli.entry_point()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _fresh(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *STAGE1,
        *tiny_data(root),
        "--model.init_args.loss.num_points=256",
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.logger.init_args.version=run",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_a_fresh_fit_never_replaces_another_runs_checkpoints(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = tmp_path / "fewshot-seg" / "run"
    (folder / "checkpoints").mkdir(parents=True)
    earlier = folder / "checkpoints" / "best-step7.ckpt"
    torch.save({"global_step": 7}, earlier)
    code, err = _console(monkeypatch, capsys, *_fresh(synthetic_root, tmp_path))
    assert code == 2 and err == [
        f"error: run folder {folder} holds the checkpoints of an earlier fit (best-step7.ckpt): continue it "
        "with --ckpt_path last, or pass --overwrite=true to delete them and start over"
    ]
    assert torch.load(earlier, weights_only=True) == {"global_step": 7}
    code, err = _console(monkeypatch, capsys, *_fresh(synthetic_root, tmp_path, "--overwrite=true"))
    assert code == 0 and err == [] and not earlier.exists()
    assert (folder / "checkpoints" / "last.ckpt").is_file() and not (folder / ".fit.lock").exists()


def test_a_run_folder_is_owned_by_one_fit(synthetic_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import fcntl
    import json
    import os

    folder = tmp_path / "fewshot-seg" / "run"
    folder.mkdir(parents=True)
    lock = folder / ".fit.lock"
    # Another fit holds the folder: its lock taken, its name in the file.
    other = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(other, json.dumps({"pid": 4242, "host": "node7", "started": "2026-01-01 00:00:00"}).encode())
    code, err = _console(monkeypatch, capsys, *_fresh(synthetic_root, tmp_path))
    assert code == 2 and err == [
        f"error: run folder {folder} is in use by another fit (pid 4242 on node7, since 2026-01-01 00:00:00; "
        f"lock file {lock}): wait for it, or give this fit its own run folder"
    ]
    assert not (folder / "checkpoints").exists()
    # That fit ended (killed: its lock file stays, the kernel dropped the lock): the folder is taken over.
    os.close(other)
    assert lock.exists()
    code, err = _console(monkeypatch, capsys, *_fresh(synthetic_root, tmp_path))
    assert code == 0 and err == [] and not lock.exists()
