"""What an episode dataset reads from: images with semantic labels, and their per-class pixel counts."""

from __future__ import annotations

import multiprocessing as mp
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fewshot_seg.episode import IGNORE_INDEX

from .cache import atomic_write_json, read_json
from .errors import DatasetError, reading

ClassCounts = dict[str, dict[int, int]]
"""image id -> {class id: pixel count} for every class (not background, not 255) in its label.

Sources that assign an image its class by where it is stored (one folder per class) list that class
even when its mask is empty (count 0), so a pool threshold of 0 keeps every listed image."""


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from an image file, with a DatasetError naming an unreadable file."""
    with reading(path, "image"), Image.open(path) as im:
        im.load()
        # JPEGs are RGB already: no convert(), which would copy the decoded image once more.
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def read_label_png(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """``[H, W]`` uint8 label from a palette or greyscale PNG, checked to hold only {0..C, 255}."""
    with reading(path, "label", "a PNG"), Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(
                f"label {path} has mode {im.mode}; expected a palette (P) or greyscale (L) PNG "
                "whose pixel values are class indices"
            )
        arr = np.asarray(im)
    check_label_values(arr, num_classes, str(path))
    return arr.astype(np.uint8, copy=False)


def check_label_values(label: np.ndarray, num_classes: int, where: str) -> None:
    """Raise a DatasetError naming ``where`` if ``label`` holds a value outside {0..C, 255}."""
    if label.dtype == np.uint8:  # a histogram is ~10x cheaper than np.unique's sort on every read
        counts = np.bincount(label.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(counts[num_classes + 1 :]) + num_classes + 1 if v != IGNORE_INDEX]
        if bad:
            allowed = f"{{0..{num_classes}, {IGNORE_INDEX}}}"
            raise DatasetError(f"label {where} holds values {[int(v) for v in bad]} outside {allowed}")
        return
    values = np.unique(label)
    bad = values[(values > num_classes) & (values != IGNORE_INDEX)]
    if bad.size or (values < 0).any():
        raise DatasetError(
            f"label {where} holds values {sorted(int(v) for v in bad)} outside "
            f"{{0..{num_classes}, {IGNORE_INDEX}}}"
        )


def class_pixel_counts(label: np.ndarray) -> dict[int, int]:
    """{class id: pixel count} of a ``[H, W]`` uint8 label (background 0 and 255 left out)."""
    counts = np.bincount(label.ravel(), minlength=256)
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts) if 0 < c < IGNORE_INDEX}


class SegmentationSource(ABC):
    """A list of images with semantic labels: 0 = background, 1..C = global class id, 255 = ignore.

    Datasets with more classes than a uint8 label holds (FSS-1000, LVIS) return *image-local* labels
    instead: values 1..n of one image stand for the global classes given by :meth:`label_classes`.
    Class counts, pools, training class choice and binary masks go through that mapping, so an
    episode's ``class_id`` is always the global id; sources whose values are the global ids (VOC,
    COCO, synthetic) keep the default (no mapping).
    """

    num_classes: int
    ids: list[str]

    @abstractmethod
    def load_image(self, image_id: str) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB."""

    @abstractmethod
    def load_label(self, image_id: str) -> np.ndarray:
        """``[H, W]`` uint8 semantic label of the same size as the image."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the labels may have changed (keys the class-count cache)."""

    def label_classes(self, image_id: str) -> dict[int, int] | None:
        """Image-local labels: label value -> global class id in ``image_id``'s label.

        None (the default): the label values are the global class ids.
        """
        return None

    def class_value(self, image_id: str, class_id: int) -> int:
        """The label value of global class ``class_id`` in ``image_id``'s label."""
        mapping = self.label_classes(image_id)
        if mapping is None:
            return class_id
        for value, c in mapping.items():
            if c == class_id:
                return value
        raise DatasetError(f"class {class_id} is not in the label of image {image_id!r}")

    def load_class_label(self, image_id: str, class_id: int) -> np.ndarray:
        """The label with every pixel of ``class_id`` kept (default: :meth:`load_label`).

        Sources whose class masks overlap (LVIS) paint ``class_id`` last, so its mask is whole.
        """
        return self.load_label(image_id)

    def image_class_counts(self, image_id: str) -> dict[int, int]:
        """{global class id: pixel count} of one image (background and 255 left out)."""
        counts = class_pixel_counts(self.load_label(image_id))
        mapping = self.label_classes(image_id)
        if mapping is None:
            return counts
        unknown = sorted(set(counts) - set(mapping))
        if unknown:
            raise DatasetError(f"label of image {image_id!r} holds values {unknown} with no class")
        return {mapping[v]: n for v, n in counts.items()}

    def load(self, image_id: str, class_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image and label, checked to have the same size.

        ``class_id``: the episode class, whose pixels the label must keep whole
        (:meth:`load_class_label`); None = :meth:`load_label`.
        """
        image = self.load_image(image_id)
        label = self.load_label(image_id) if class_id is None else self.load_class_label(image_id, class_id)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image_id!r} is {image.shape[1]}x{image.shape[0]} but its label is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        return image, label

    def _scan(self, desc: str) -> ClassCounts:
        """Class counts of every image, over all available cores (forked workers), with a progress bar."""
        global _SCANNED
        workers = scan_workers(len(self.ids))
        bar = tqdm(total=len(self.ids), desc=desc, unit="img", mininterval=1.0, disable=len(self.ids) < 200)
        counts: ClassCounts = {}
        if workers == 1:
            for image_id in self.ids:
                counts[image_id] = self.image_class_counts(image_id)
                bar.update()
        else:
            chunks = [self.ids[i : i + SCAN_CHUNK] for i in range(0, len(self.ids), SCAN_CHUNK)]
            _SCANNED = self
            try:
                with mp.get_context("fork").Pool(workers) as pool:  # fork: the workers share this source
                    for part in pool.imap(_count_chunk, chunks):
                        counts.update(part)
                        bar.update(len(part))
            finally:
                _SCANNED = None
        bar.close()
        return {i: counts[i] for i in self.ids}  # the id order, whatever order the chunks came back in

    def class_counts(self, cache_path: str | os.PathLike, desc: str) -> ClassCounts:
        """Per-image class pixel counts, read from ``cache_path`` or computed once and cached there.

        The cache is keyed on :meth:`fingerprint`, so editing, adding or removing label files
        triggers a rescan (with a progress bar) on the next use.
        """
        fp = self.fingerprint()
        cached = read_json(cache_path)
        if isinstance(cached, dict) and cached.get("fingerprint") == fp:
            return {k: {int(c): int(n) for c, n in v.items()} for k, v in cached["counts"].items()}
        counts = self._scan(desc)
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path, {"fingerprint": fp, "counts": counts})
        return counts


SCAN_CHUNK = 256
"""Images per task of the parallel class-count scan."""


def scan_workers(num_images: int) -> int:
    """Processes for a class-count scan: every available core for a large set, one for a small one."""
    if num_images < 4 * SCAN_CHUNK or "fork" not in mp.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 16))


_SCANNED: SegmentationSource | None = None  # the source a forked scan worker reads (set before forking)


def _count_chunk(ids: list[str]) -> list[tuple[str, dict[int, int]]]:
    assert _SCANNED is not None
    return [(i, _SCANNED.image_class_counts(i)) for i in ids]


def build_pools(counts: ClassCounts, classes: list[int], min_pixels: int) -> dict[int, list[str]]:
    """Class pools: for each class, the sorted ids of images where it covers >= ``min_pixels`` px."""
    pools: dict[int, list[str]] = {c: [] for c in classes}
    for image_id in sorted(counts):
        for c, n in counts[image_id].items():
            if c in pools and n >= min_pixels:
                pools[c].append(image_id)
    return pools


def check_pools(
    pools: dict[int, list[str]], shot: int, split: str, names: dict[int, str] | None = None
) -> None:
    """Every class needs a query plus ``shot`` distinct supports: raise naming the classes that lack them."""
    short = [c for c, ids in sorted(pools.items()) if len(ids) < shot + 1]
    if short:
        desc = ", ".join(
            f"class {c}" + (f" ({names[c]})" if names and c in names else "") + f": {len(pools[c])} images"
            for c in short
        )
        raise DatasetError(
            f"{split} class pool too small for {shot}-shot episodes (need at least {shot + 1} images "
            f"with the class, i.e. a query plus {shot} supports): {desc}"
        )
