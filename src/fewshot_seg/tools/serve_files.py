"""The files of ``fewshot-seg serve``: its temporary folder and the zips of masks it keeps there.

The folder (``<tmp>/fewshot-seg-serve-XXXX``) holds an exclusive ``flock`` on its ``.lock`` file for as
long as its server runs. The server removes it when it stops (Ctrl-C, SIGTERM, SIGHUP); a server killed
without a chance to clean (``kill -9``, the OOM killer) leaves it, and the next server started removes
every such folder whose lock nobody holds (the kernel drops a dead process's ``flock``, so a live
server's folder is never taken, whatever its pid). The zips are capped: the oldest is deleted once
:data:`MAX_ZIPS` are kept, so a long session does not fill the disk.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

PREFIX = "fewshot-seg-serve-"
LOCK_FILE = ".lock"
MAX_ZIPS = 20


class WorkFolder:
    """A server's temporary folder, locked while it lives.

    Args:
        parent: where to create it (default: the system's temporary folder, ``$TMPDIR``).
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = Path(parent or tempfile.gettempdir())
        self.removed_stale = remove_stale(self.parent)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.parent))
        self._fd = os.open(self.path / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def remove(self) -> None:
        """Delete the folder and everything in it (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def remove_stale(parent: Path) -> list[Path]:
    """Remove the folders under ``parent`` left by servers that died without cleaning; returns them.

    Only folders of this user, with a ``.lock`` file whose ``flock`` can be taken (no live server holds it).
    """
    removed = []
    for folder in parent.glob(f"{PREFIX}*"):
        lock = folder / LOCK_FILE
        try:
            if not folder.is_dir() or folder.stat().st_uid != os.getuid() or not lock.is_file():
                continue
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live server holds it
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class ZipStore:
    """The zips of one server, by token; the oldest deleted beyond ``limit``."""

    def __init__(self, folder: Path, limit: int = MAX_ZIPS) -> None:
        self.folder = folder
        self.limit = limit
        self._zips: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def new_path(self, token: str) -> Path:
        """Where the zip of ``token`` is written (:meth:`add` it once complete)."""
        return self.folder / f"{token}.zip"

    def add(self, token: str) -> None:
        """Keep the written zip of ``token``; delete the oldest ones beyond the limit."""
        with self._lock:
            self._zips[token] = self.new_path(token)
            while len(self._zips) > self.limit:
                _, old = self._zips.popitem(last=False)
                old.unlink(missing_ok=True)

    def get(self, token: str) -> Path | None:
        """The zip of ``token``, or None (unknown, or deleted as one of the oldest)."""
        with self._lock:
            return self._zips.get(token)


__all__ = ["LOCK_FILE", "MAX_ZIPS", "PREFIX", "WorkFolder", "ZipStore", "remove_stale"]
