"""Atomic JSON writes and file fingerprints used to invalidate caches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so readers only ever see a complete file (mode 0666 & ~umask).

    The data goes to a temporary file in the same directory (same file system, so the final
    ``os.replace`` is atomic even if several processes race to build the same cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
        # mkstemp creates the file 0600; a cache in a shared data root must be readable by the team.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed JSON at ``path``, or None when it is missing or unreadable (a stale cache)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fingerprint_files(paths: Iterable[str | os.PathLike], extra: Any = None) -> str:
    """A hash of the names, sizes and modification times of ``paths`` (plus ``extra``).

    Any added, removed, resized or touched file changes it, which is what invalidates a cache
    without re-reading file contents.
    """
    h = hashlib.sha1()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in sorted(str(p) for p in paths):
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def swap_in_dir(new: Path, dest: Path) -> None:
    """Make the finished folder ``new`` become ``dest`` (same parent file system), replacing any old one.

    The old folder is renamed aside before ``new`` is renamed into place and only then deleted, so a
    reader never sees a half-written ``dest`` and a crash never leaves none.
    """
    aside = None
    if dest.exists():
        aside = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(dest, aside)
    os.replace(new, dest)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
