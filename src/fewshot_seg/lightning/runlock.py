"""A run folder belongs to one fit: a lock file while it runs, and no fresh fit over earlier checkpoints.

Two fits started into the same run folder (the same ``default_root_dir`` without a logger, or the same
logger ``version``) would write their checkpoints over each other's. ``fit`` therefore takes
``<run folder>/.fit.lock`` (pid, host, start time) before it writes anything, and refuses a folder whose
lock belongs to a live process; the lock of a process that is gone is taken over. A *fresh* fit (no
``--ckpt_path``) into a folder that already holds checkpoints is refused unless told to resume
(``--ckpt_path last``) or to overwrite (``--overwrite=true``: the earlier checkpoints are deleted, and
named).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from pytorch_lightning import Callback

from fewshot_seg.lightning.checkpoints import checkpoint_files

LOCK_NAME = ".fit.lock"


class RunFolderError(ValueError):
    """A run folder this fit may not write into (in use by another fit, or holding another run's files)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The lock file of one run folder, held by this process until :meth:`release` (or exit)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunFolderError naming the folder and its owner."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._stale(owner):
                    self.path.unlink(missing_ok=True)  # its fit is gone (killed): take the folder over
                    continue
                who = (
                    f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}; "
                    if owner
                    else ""
                )
                raise RunFolderError(
                    f"run folder {self.folder} is in use by another fit ({who}lock file {self.path}): wait "
                    "for it, or give this fit its own run folder"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunFolderError(f"run folder {self.folder}: could not take the lock file {self.path}")

    def _owner(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written by its owner this very moment, or unreadable: in use
        return data if isinstance(data, dict) else None

    @staticmethod
    def _stale(owner: dict) -> bool:
        """The owner's process is gone (checkable only on this host)."""
        pid = owner.get("pid")
        return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


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
