"""A run folder belongs to one fit: a lock file while it runs, and no fresh fit over earlier checkpoints.

Two fits started into the same run folder (the same ``default_root_dir`` without a logger, or the same
logger ``version``) would write their checkpoints over each other's. ``fit`` therefore takes
``<run folder>/.fit.lock`` (an exclusive ``flock``; the file names the owner) before it writes anything,
and refuses a folder whose lock is held; a lock file left by a process that is gone is taken over. A
*fresh* fit (no ``--ckpt_path``) into a folder that already holds checkpoints is refused unless told to
resume (``--ckpt_path last``) or to overwrite (``--overwrite=true``: the earlier checkpoints are
deleted, and named).

Global rank 0 decides (:func:`claim_run_folder`), and every rank of a multi-process fit exits with its one
line: ranks started by the cluster (``srun``, ``torchrun``) would otherwise wait for a rank 0 that has
already left, in process-group initialisation, until its timeout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback

from fewshot_seg.checkpoints import checkpoint_files
from fewshot_seg.folder_lock import LOCK_NAME, RunFolderError, RunLock

CLAIMED_ENV = "FEWSHOT_SEG_RUN_FOLDER_CLAIMED_BY"
"""Set by a global rank 0 that claimed the run folder before Lightning started the other ranks (its pid):
those ranks, its child processes, inherit it and know the folder is claimed."""


class ReleaseOnException(Callback):
    """Releases the run folder's lock when the fit fails (``after_fit`` releases it when it succeeds)."""

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def on_exception(self, trainer: object, pl_module: object, exception: BaseException) -> None:
        self.lock.release()


def check_fresh_fit(folder: Path, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear, naming them) the checkpoints an earlier fit left in ``folder``."""
    ckpts = checkpoint_files(Path(folder) / "checkpoints")
    if not ckpts:
        return
    names = ", ".join(p.name for p in ckpts)
    if not overwrite:
        raise RunFolderError(
            f"run folder {folder} holds the checkpoints of an earlier fit ({names}): continue it with "
            "--ckpt_path last, or pass --overwrite=true to delete them and start over"
        )
    for p in ckpts:
        p.unlink()
    print(
        f"--overwrite: deleted the earlier fit's checkpoints in {folder / 'checkpoints'}: {names}",
        file=sys.stderr,
    )


def _claim(folder: Path, fresh: bool, overwrite: bool) -> RunLock:
    """Take the folder's lock and, for a fresh fit, check (or clear) earlier checkpoints."""
    lock = RunLock(folder).acquire()
    try:
        if fresh:
            check_fresh_fit(folder, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_run_folder(trainer: Any, folder: Path, fresh: bool, overwrite: bool) -> RunLock | None:
    """Claim ``folder`` for this fit on global rank 0, or refuse it on *every* rank with the same line.

    Where the other ranks only start once rank 0 has claimed the folder (one process; Lightning's own
    launcher, whose children inherit :data:`CLAIMED_ENV`), rank 0 decides alone. Where the cluster started
    every rank (``srun``, ``torchrun``: ``creates_processes_externally``), all ranks are here at once: they
    initialise the process group now (the fit would next), rank 0 claims the folder and broadcasts its
    refusal, and every rank raises it.

    Args:
        trainer: the fit's Trainer (its strategy, ranks and world size).
        folder: the run folder (as rank 0 computes it; the other ranks' value is not used).
        fresh: a fit without ``--ckpt_path``: earlier checkpoints are refused unless ``overwrite``.
        overwrite: delete (naming them) an earlier fit's checkpoints instead of refusing.

    Returns:
        The held lock on global rank 0, None on the other ranks.

    Raises:
        RunFolderError: on every rank, when rank 0 may not use the folder.
    """
    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    claimed_by_parent = os.environ.get(CLAIMED_ENV) == str(os.getppid())
    together = trainer.world_size > 1 and bool(getattr(env, "creates_processes_externally", False))
    if not together or claimed_by_parent:
        if not trainer.is_global_zero:
            return None  # started by a global rank 0 that has claimed the folder
        lock = _claim(folder, fresh, overwrite)
        if trainer.world_size > 1:
            os.environ[CLAIMED_ENV] = str(os.getpid())  # the ranks Lightning starts next inherit it
        return lock
    strategy.setup_environment()  # the process group: every rank is here, none waits for a rank gone
    lock, failure, refusal = None, None, None
    if trainer.is_global_zero:
        try:
            lock = _claim(folder, fresh, overwrite)
        except Exception as err:
            failure = err
            refusal = (
                str(err)
                if isinstance(err, RunFolderError)
                else f"run folder {folder}: global rank 0 could not claim it ({type(err).__name__}: {err})"
            )
    refusal = strategy.broadcast(refusal, src=0)
    if refusal is None:
        return lock
    torch.distributed.destroy_process_group()
    if failure is not None and not isinstance(failure, RunFolderError):
        raise failure  # rank 0 shows its own error in full; the others say what stopped it
    raise RunFolderError(refusal)


__all__ = [
    "LOCK_NAME",
    "ReleaseOnException",
    "RunFolderError",
    "RunLock",
    "check_fresh_fit",
    "claim_run_folder",
]
