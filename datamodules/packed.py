"""Python records packed into numpy byte buffers, shared by DataLoader workers without copies.

A list of Python objects (COCO's 600k polygon annotations, say) in the main process is shared with
forked DataLoader workers only until it is read: reading an object changes its reference count, which
writes to its memory page, and the kernel then copies that page into the worker. After some epochs
every worker holds its own copy. detectron2 serialises its dataset list into one buffer for this
reason; :class:`PackedList` does the same, and can also live in a file mapped into every process
(``np.load(mmap_mode="r")``), where the pages are the operating system's page cache.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class PackedList:
    """A read-only sequence of picklable records stored as ``buffer[offsets[i]:offsets[i + 1]]``.

    Args:
        buffer: uint8 ``[total bytes]``, the records pickled one after the other.
        offsets: int64 ``[len + 1]``, where each record starts (and the last one ends).
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray) -> None:
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def from_items(cls, items: Iterable[Any]) -> PackedList:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        return cls(np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Any:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return pickle.loads(self.buffer[start:end].tobytes())

    def save(self, prefix: Path) -> None:
        """Write ``<prefix>.buf.npy`` and ``<prefix>.off.npy``, each atomically (a rename into place)."""
        for suffix, array in ((".buf.npy", self.buffer), (".off.npy", self.offsets)):
            path = prefix.with_name(prefix.name + suffix)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:
                with open(tmp, "wb") as f:  # mode 0666 & ~umask, as the JSON caches (datamodules/cache.py)
                    np.save(f, np.ascontiguousarray(array))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    @classmethod
    def load(cls, prefix: Path) -> PackedList:
        """The list saved at ``prefix``, memory-mapped: every process reads the same page-cache pages."""
        buffer = np.load(prefix.with_name(prefix.name + ".buf.npy"), mmap_mode="r")
        offsets = np.load(prefix.with_name(prefix.name + ".off.npy"), mmap_mode="r")
        return cls(buffer, offsets)
