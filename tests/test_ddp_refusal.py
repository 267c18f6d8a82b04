"""A run folder refused under ``srun``: every rank exits with the same one line, none waits in DDP set-up.

SLURM starts every rank itself (Lightning's ``SLURMEnvironment``); here two processes on the CPU (gloo)
get the variables ``srun --ntasks-per-node=2`` would set. Before the fix only global rank 0 checked the
run folder: it left with its error while rank 1 waited for it in process-group initialisation until the
timeout (30 minutes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import STAGE1, run_dir_args, tiny_data

from fewshot_seg.lightning.runlock import CLAIMED_ENV, RunLock

pytestmark = pytest.mark.slow
WAIT_S = 240  # far less than the process-group timeout: a rank left waiting fails the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun(args: list[str], cwd: Path) -> list[tuple[int, str, str]]:
    """``fewshot-seg <args>`` as 2 SLURM tasks on one node; each rank's (exit code, stdout, stderr)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k != CLAIMED_ENV and not k.startswith("SLURM_")}
        env.update(
            OMP_NUM_THREADS="1",
            WANDB_MODE="disabled",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_NNODES="1",
            SLURM_NODEID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NAME="fewshot-test",
            SLURM_JOB_ID="4242",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [sys.executable, "-m", "fewshot_seg.cli", *args, "--trainer.accelerator=cpu"]
        cmd += ["--trainer.devices=2", "--trainer.strategy=ddp"]
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    out = []
    for proc in procs:
        try:
            std, err = proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank was still running after {WAIT_S} s (waiting for a rank that had left)")
        out.append((proc.returncode, std, err))
    return out


def _last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def test_every_rank_refuses_with_the_same_line(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["fit", *STAGE1, *tiny_data(synthetic_root), *run_dir_args(tmp_path / "out", "run")]
    folder = tmp_path / "out" / "fewshot-seg" / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"an earlier fit's checkpoint")

    # A fresh fit over an earlier fit's checkpoints.
    ranks = _srun(args, tmp_path)
    lines = {_last_line(err) for _, _, err in ranks}
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    assert len(lines) == 1, lines
    assert lines.pop().startswith(f"error: run folder {folder} holds the checkpoints of an earlier fit")

    # A folder whose lock another fit holds (here: this process).
    lock = RunLock(folder).acquire()
    try:
        ranks = _srun([*args, "--overwrite=true"], tmp_path)
    finally:
        lock.release()
    lines = {_last_line(err) for _, _, err in ranks}
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    assert len(lines) == 1, lines
    assert lines.pop().startswith(f"error: run folder {folder} is in use by another fit (pid {os.getpid()}")
    assert (folder / "checkpoints" / "last.ckpt").exists()  # refused before anything was deleted

    # Allowed (--overwrite): the ranks, met early, go on to train together.
    steps = ["--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1"]
    ranks = _srun([*args, "--overwrite=true", *steps], tmp_path)
    assert [code for code, _, _ in ranks] == [0, 0], [err[-2000:] for _, _, err in ranks]
    printed = "".join(std + err for _, std, err in ranks)
    assert "--overwrite: deleted the earlier fit's checkpoints" in printed
    assert "distributed_backend=gloo" in printed, "did not run as 2-process DDP"
    assert (folder / "checkpoints" / "last.ckpt").stat().st_size > 100  # the new fit's
