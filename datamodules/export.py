"""A VOC-format dataset (the synthetic set) written in the formats of a user's own data, pixel for pixel.

``voc_to_coco_format`` writes COCO instance JSONs (one compressed RLE per class of an image, the 255
boundary band as a crowd region painted 255 with ``crowd: ignore``, non-contiguous category ids);
``voc_to_mask_folder`` links images and masks into the mask-folder layout with ``classes.txt`` and
``splits/``. The same data through another DataModule must give the same episodes (tests) and the
same numbers (``benchmarks/own_data_parity.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from fewshot_seg.episode import IGNORE_INDEX

from .pascal import VOCSource

CATEGORY_ID_STEP = 7
"""Category id of class c is ``3 + 7 * c``: non-contiguous ids in the same order as the classes."""

IMAGE_ID_BASE = {"train": 1_000_000, "test": 2_000_000}
"""Image k of a split gets id ``base + k``: as strings, the ids sort as the VOC ids do."""


def category_id(class_index: int) -> int:
    return 3 + CATEGORY_ID_STEP * class_index


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def voc_to_coco_format(
    voc_root: str | os.PathLike, out: str | os.PathLike, class_names: Sequence[str]
) -> dict:
    """Write ``<out>/annotations/{train,test}.json`` for the VOC images of ``voc_root`` (image files stay
    in ``<voc_root>/JPEGImages``); returns {split: JSON path}."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": category_id(i + 1), "name": n, "supercategory": ""} for i, n in enumerate(class_names)
    ]
    paths = {}
    for split in ("train", "test"):
        src = VOCSource(voc_root, split)
        images, anns = [], []
        for k, voc_id in enumerate(src.ids):
            label = src.load_label(voc_id)
            h, w = label.shape
            image_id = IMAGE_ID_BASE[split] + k
            images.append({"id": image_id, "file_name": f"{voc_id}.jpg", "height": h, "width": w})
            for c in (int(v) for v in np.unique(label) if 0 < v < IGNORE_INDEX):
                anns.append({"image_id": image_id, "category_id": category_id(c), "iscrowd": 0,
                             "segmentation": _rle(label == c)})  # fmt: skip
            if (label == IGNORE_INDEX).any():  # painted last, as the VOC band lies over the objects
                anns.append({"image_id": image_id, "category_id": category_id(1), "iscrowd": 1,
                             "segmentation": _rle(label == IGNORE_INDEX)})  # fmt: skip
        for a_id, a in enumerate(anns, start=1):
            a.update(id=a_id, area=float(mask_utils.area(a["segmentation"])), bbox=[0, 0, 1, 1])
        paths[split] = out / "annotations" / f"{split}.json"
        paths[split].write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return paths


def voc_to_mask_folder(
    voc_root: str | os.PathLike, out: str | os.PathLike, class_names: Sequence[str]
) -> Path:
    """Link the VOC images and labels of ``voc_root`` into ``<out>/images``, ``<out>/masks`` with
    ``classes.txt`` and ``splits/{train,test}.txt``; returns ``out``."""
    voc_root, out = Path(voc_root).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, target in (("images", "JPEGImages"), ("masks", "SegmentationClassAug")):
        if not (out / name).exists():
            (out / name).symlink_to(voc_root / target, target_is_directory=True)
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    (out / "splits").mkdir(exist_ok=True)
    for split in ("train", "test"):
        (out / "splits" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in VOCSource(voc_root, split).ids)
        )
    return out
