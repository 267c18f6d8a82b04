"""Benchmarks stored as images with one binary mask each, grouped one folder per class.

FSS-1000, Deepglobe (PATNet's tiles), ISIC-2018 and Chest X-ray differ only in where images and masks
are and how a mask's file name follows from its image's: each DataModule lists its
``(image id, image, mask, class)`` items with its own path rule and hands them to
:class:`BinaryMaskFolderSource`, which reads the masks the way HSNet and PATNet do (greyscale >= 128 is
foreground). Labels are image-local: value 1 is the image's class (:meth:`~SegmentationSource.label_classes`),
so 1,000 FSS classes need no more than a uint8 label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from .cache import fingerprint_files
from .errors import DatasetError, reading
from .source import SegmentationSource, read_rgb

MASK_THRESHOLD = 128
"""Greyscale value from which a mask pixel is foreground (HSNet ``data/fss.py``, PATNet's loaders)."""

COLOUR_SPREAD = 128
"""A mask pixel whose R, G and B differ by this much or more is colour, not black/white."""

ACCEPTED_MASK_MODES = ("1", "L", "LA", "RGB", "RGBA")


class MaskedImage(NamedTuple):
    """One image of a binary-mask benchmark."""

    image_id: str
    image: Path
    mask: Path
    class_id: int


def read_threshold_mask(path: str | os.PathLike) -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1}: 1 where the mask's greyscale value is >= 128.

    Accepted: black-and-white masks stored as 1-bit, greyscale (``L``, ``LA``) or RGB(A) PNGs whose pixels
    are grey (as the published FSS-1000, Deepglobe, ISIC and Chest X-ray masks are; anti-aliased or
    lossy edges are split at 128). Refused with the file named: palette PNGs (class-index labels such
    as VOC's), 16-bit or float images, colour labels (a pixel whose channels differ by >= 128, e.g. a
    raw DeepGlobe land-cover mask), and 0/1 masks (their objects would vanish at the 128 threshold).
    """
    with reading(path, "mask"), Image.open(path) as im:
        mode = im.mode
        if mode == "P":
            raise DatasetError(
                f"mask {path} is a palette PNG (class indices); expected a black-and-white mask "
                "(greyscale or RGB, 0 = background, 255 = object)"
            )
        if mode not in ACCEPTED_MASK_MODES:
            raise DatasetError(
                f"mask {path} has mode {mode}; expected an 8-bit black-and-white mask (modes "
                f"{', '.join(ACCEPTED_MASK_MODES)})"
            )
        if mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB"))
            spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
            if spread.max() >= COLOUR_SPREAD:
                y, x = np.unravel_index(int(spread.argmax()), spread.shape)
                colour = tuple(int(v) for v in rgb[y, x])
                raise DatasetError(
                    f"mask {path} is a colour label (pixel ({x}, {y}) is {colour}); expected a "
                    "black-and-white mask, one file per class"
                )
        grey = np.asarray(im.convert("L"))
    if grey.max(initial=0) == 1:
        raise DatasetError(
            f"mask {path} holds only the values 0 and 1: at the threshold {MASK_THRESHOLD} it would be all "
            "background; expected 0 = background, 255 = object"
        )
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


def pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], mask_for: str, image_for: str, require_mask: bool = True
) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for every stem, raising a DatasetError that names an unpaired file.

    Args:
        images: stem -> image file.
        masks: stem -> mask file (keyed by the stem of the image it belongs to).
        mask_for: format of the expected mask path of an image stem (``{stem}`` is replaced).
        image_for: format of the expected image path of a mask's stem.
        require_mask: an image without a mask is an error (else it is skipped: unlabelled images).
    """
    for stem, mask in sorted(masks.items()):
        if stem not in images:
            raise DatasetError(f"mask {mask} has no image: expected {image_for.format(stem=stem)}")
    if require_mask:
        for stem, image in sorted(images.items()):
            if stem not in masks:
                raise DatasetError(f"image {image} has no mask: expected {mask_for.format(stem=stem)}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(set(images) & set(masks))]


def files_with_suffix(folder: Path, suffix: str, strip: str = "") -> dict[str, Path]:
    """stem -> file for the files of ``folder`` ending in ``suffix`` (case-insensitive), ``strip``
    removed from the end of the stem."""
    out: dict[str, Path] = {}
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(suffix) and not name.startswith("."):
            stem = name[: -len(suffix)]
            if strip and stem.endswith(strip):
                stem = stem[: -len(strip)]
            out[stem] = folder / name
    return out


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}\n{layout}")
    return path


class BinaryMaskFolderSource(SegmentationSource):
    """Images with one black-and-white mask each and a class given by where they are stored.

    The label of an image is its thresholded mask (:func:`read_threshold_mask`): 0 background, 1 the
    image's class (image-local value; :meth:`label_classes` maps it to the global id). Every image
    counts as a member of its class, also with an empty mask (count 0), as in HSNet and PATNet, whose
    candidate lists are the folder listings. A mask of another size than its image is resized to the
    image (nearest), as the published loaders do by resizing both to the test size independently.
    """

    num_classes = 1

    def __init__(self, items: Iterable[MaskedImage], what: str) -> None:
        self.items: dict[str, MaskedImage] = {}
        for item in items:
            if item.image_id in self.items:
                raise DatasetError(f"{what}: image id {item.image_id!r} is listed twice ({item.image})")
            self.items[item.image_id] = item
        if not self.items:
            raise DatasetError(f"{what}: no images found")
        self.ids = sorted(self.items)
        self.what = what

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.items[image_id].image)

    def load_label(self, image_id: str) -> np.ndarray:
        return read_threshold_mask(self.items[image_id].mask)

    def label_classes(self, image_id: str) -> dict[int, int]:
        return {1: self.items[image_id].class_id}

    def image_class_counts(self, image_id: str) -> dict[int, int]:
        return {self.items[image_id].class_id: int(np.count_nonzero(self.load_label(image_id)))}

    def load(self, image_id: str, class_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.load_image(image_id), self.load_label(image_id)
        h, w = image.shape[:2]
        if label.shape != (h, w):
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        return image, label

    def fingerprint(self) -> str:
        assignment = [(i, self.items[i].class_id, str(self.items[i].image)) for i in self.ids]
        return fingerprint_files((self.items[i].mask for i in self.ids), extra=assignment)
