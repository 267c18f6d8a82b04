"""Class-index label maps as files viewers show in colour: the palette and the palette-PNG writer.

A label map (``[H, W]`` uint8, 0 background, i = the i-th class, 255 ignore) is saved as a palette
("P" mode) PNG: the pixel values stay the class indices (read back by ``multiclass.read_index_mask``,
usable again as a class-index support mask) while image viewers, CVAT and Label Studio show the
palette's colours. The palette is PASCAL VOC's (the colours of its ``SegmentationClass`` PNGs: class 1
dark red, 2 green, 3 olive, ...; 255 light beige), so VOC tools show the classes as they know them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_seg.atomic import write_atomic

Color = tuple[int, int, int]


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (bit-interleaved), flattened RGB, as VOC label PNGs use."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):  # bit j of each 3-bit group of the index goes to bit 7 - j of its channel
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def class_colors() -> list[Color]:
    """The RGB colour of each label value 0..255 (:func:`voc_palette`)."""
    pal = voc_palette()
    return [(pal[3 * i], pal[3 * i + 1], pal[3 * i + 2]) for i in range(256)]


def label_image(labels: np.ndarray) -> Image.Image:
    """``[H, W]`` uint8 label map -> palette PNG image (values kept, colours from :func:`class_colors`)."""
    values = np.asarray(labels)
    if values.ndim != 2 or values.dtype != np.uint8:
        raise ValueError(f"a label map must be [H, W] uint8, got {values.dtype} {list(values.shape)}")
    image = Image.frombytes("P", (values.shape[1], values.shape[0]), np.ascontiguousarray(values).tobytes())
    image.putpalette(voc_palette())
    return image


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Save a label map as a palette PNG at ``path``, atomically (``fewshot_seg.atomic``)."""
    image = label_image(labels)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


__all__ = ["class_colors", "label_image", "voc_palette", "write_label_png"]
