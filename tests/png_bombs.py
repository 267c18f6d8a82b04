"""PNG files that declare a large size in their header but hold almost no data: decompression-bomb
stand-ins for the page's tests (``test_serve.py``, ``test_serve_limits.py``)."""

from __future__ import annotations

import struct
import zlib


def png_header(width: int, height: int, rows: int = 0) -> bytes:
    """A greyscale PNG that declares ``width x height`` but holds only ``rows`` rows of zeros (a stand-in
    for a decompression bomb: only a decoder that trusts the header spends the memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (rows * (width + 1)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
