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

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from pytorch_lightning import Callback

try:
    import fcntl
except ImportError:  # not POSIX (Windows): fits run unlocked
    fcntl = None

from fewshot_seg.checkpoints import checkpoint_files

LOCK_NAME = ".fit.lock"


class RunFolderError(ValueError):
    """A run folder this fit may not write into (in use by another fit, or holding another run's files)."""


class RunLock:
    """The lock file of one run folder, held by this process until :meth:`release` (or its end).

    An exclusive ``flock`` on ``<folder>/.fit.lock``, which also records the owner (pid, host, start
    time, command) for the message a second fit gets. The kernel drops the lock when its process ends,
    however it ends (a kill, a SLURM time limit), so a file left behind by a dead fit is simply taken
    over; there is no staleness guess. (On a file system without locks the fit runs unlocked, with a
    warning.)
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunFolderError naming the folder and its owner."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        while fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._owner()
                who = (
                    f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}; "
                    if owner
                    else ""
                )
                raise RunFolderError(
                    f"run folder {self.folder} is in use by another fit ({who}lock file {self.path}): wait "
                    "for it, or give this fit its own run folder"
                ) from None
            except OSError as err:  # no flock on this file system
                os.close(fd)
                print(
                    f"warning: run folder {self.folder} cannot be locked ({err}); not locked", file=sys.stderr
                )
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its owner removed the file between our open and our lock: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd, self.held = fd, True
            atexit.register(self.release)
            return self
        return self

    def _owner(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written by its owner this very moment, or unreadable
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        if self.held and self._fd is not None:
            self.held = False
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting fit then retries on a new file
            os.close(self._fd)
            self._fd = None


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
