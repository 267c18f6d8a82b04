"""A run folder belongs to one fit: a lock file while it runs, and no fresh fit over earlier checkpoints.

Two fits started into the same run folder (the same ``default_root_dir`` without a logger, or the same
logger ``version``) would write their checkpoints over each other's. ``fit`` therefore takes
``<run folder>/.fit.lock`` (an exclusive ``flock``; the file names the owner) before it writes anything,
and refuses a folder whose lock is held; a lock file left by a process that is gone is taken over. A
*fresh* fit (no ``--ckpt_path``) into a folder that already holds checkpoints is refused unless told to
resume (``--ckpt_path last``) or to overwrite (``--overwrite=true``: the earlier checkpoints are
deleted, and named).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning import Callback

from fewshot_seg.checkpoints import checkpoint_files
from fewshot_seg.folder_lock import LOCK_NAME, RunFolderError, RunLock


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


__all__ = ["LOCK_NAME", "ReleaseOnException", "RunFolderError", "RunLock", "check_fresh_fit"]
