"""An exclusive lock on a folder that one process writes into: a fit's run folder, ``segment``'s ``--out``.

Lightning-free (the inference path's tools take it too; ``tests/test_inference_imports.py``).
``lightning.runlock`` adds what fits need besides (release on a failed fit, no fresh fit over
checkpoints).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs go unlocked
    fcntl = None

LOCK_NAME = ".fit.lock"


class RunFolderError(ValueError):
    """A folder this run may not write into (in use by another run, or holding another run's files)."""


class RunLock:
    """The lock file of one run folder, held by this process until :meth:`release` (or its end).

    An exclusive ``flock`` on ``<folder>/.fit.lock``, which also records the owner (pid, host, start
    time, command) for the message a second fit gets. The kernel drops the lock when its process ends,
    however it ends (a kill, a SLURM time limit), so a file left behind by a dead fit is simply taken
    over; there is no staleness guess. (On a file system without locks the run goes unlocked, with a
    warning.)
    """

    def __init__(self, folder: Path, name: str = LOCK_NAME, user: str = "fit") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.user = user  # who takes it, for the messages: "fit", "segment run"
        self.kind = "run" if user == "fit" else "output"
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
                    f"{self.kind} folder {self.folder} is in use by another {self.user} ({who}lock file "
                    f"{self.path}): wait for it, or give this {self.user} its own {self.kind} folder"
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
