"""Tiny datasets in the real on-disk formats, for tests and benchmarks (not for training).

``make_fake_voc`` writes VOC2012/SBD layout (JPEG images, palette label PNGs with 255
boundaries, val.txt); ``make_fake_coco`` writes COCO layout (JPEGs + instance JSON with polygon,
RLE and crowd annotations over the real 80 category ids).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .synthetic import add_boundary, voc_palette

# The 80 category ids of COCO (1..90 with gaps), so rank-vs-id mapping is exercised.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _noise_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_voc_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Save a ``[H, W]`` uint8 label as a VOC palette PNG."""
    png = Image.fromarray(label.astype(np.uint8), mode="P")
    png.putpalette(voc_palette())
    png.save(path)


def make_fake_voc(
    root: str | os.PathLike, per_class: int = 3, size: tuple[int, int] = (72, 96), seed: int = 0
) -> Path:
    """VOC-format dataset: for each class c and split, ``per_class`` images with a big object of c
    (>= 2,048 px) and a small object (< 2,048 px) of class ``c % 20 + 1``.

    Ids: ``tr_cCC_k`` (training) and ``va_cCC_k`` (listed in val.txt). Returns ``root``.
    """
    root = Path(root)
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    big_h, big_w = int(h * 0.72), int(w * 0.6)
    small = max(4, min(h // 5, w // 5, 40))
    assert big_h * big_w >= 2300 and small * small < 2048, "size too small for the pool rule"
    val_ids = []
    for prefix in ("tr", "va"):
        for c in range(1, 21):
            for k in range(per_class):
                image_id = f"{prefix}_c{c:02d}_{k}"
                label = np.zeros((h, w), dtype=np.uint8)
                y0, x0 = int(rng.integers(0, h - big_h + 1)), int(rng.integers(0, w - big_w + 1))
                label[y0 : y0 + big_h, x0 : x0 + big_w] = c
                label[h - small - 1 : h - 1, w - small - 1 : w - 1] = c % 20 + 1
                Image.fromarray(_noise_image(h, w, rng)).save(root / "JPEGImages" / f"{image_id}.jpg")
                write_voc_label(
                    root / "SegmentationClassAug" / f"{image_id}.png", add_boundary(label, width=2)
                )
                if prefix == "va":
                    val_ids.append(image_id)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val_ids) + "\n")
    return root


def _polygon(y0: int, x0: int, hh: int, ww: int) -> list[list[float]]:
    return [[x0, y0, x0 + ww, y0, x0 + ww, y0 + hh, x0, y0 + hh]]


def make_fake_coco(
    root: str | os.PathLike,
    year: int = 2014,
    per_class: int = 2,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> Path:
    """COCO-format dataset: every class in ``per_class`` images of each split (four quadrant
    polygons of >= 2,048 px per image), plus per split one image holding an uncompressed RLE, a
    compressed RLE overlapping it (later overwrites earlier), and a crowd region. Returns ``root``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    qh, qw = h // 2, w // 2
    categories = [{"id": cid, "name": f"cat{cid}", "supercategory": "x"} for cid in COCO_CATEGORY_IDS]
    for split in ("train", "val"):
        image_dir = root / f"{split}{year}"
        image_dir.mkdir(exist_ok=True)
        images, anns = [], []
        slots = [cid for _ in range(per_class) for cid in COCO_CATEGORY_IDS]
        n_images = (len(slots) + 3) // 4
        for i in range(n_images + 1):
            image_id = 1000 + i * 7
            name = f"COCO_{split}{year}_{image_id:012d}.jpg"
            Image.fromarray(_noise_image(h, w, rng)).save(image_dir / name)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            if i < n_images:
                for q, cid in enumerate(slots[4 * i : 4 * i + 4]):
                    y0, x0 = (q // 2) * qh + 2, (q % 2) * qw + 2
                    anns.append({"image_id": image_id, "category_id": cid, "iscrowd": 0,
                                 "segmentation": _polygon(y0, x0, qh - 4, qw - 4)})  # fmt: skip
                continue
            # The special image: uncompressed RLE, then an overlapping compressed RLE, then a crowd.
            m1 = np.zeros((h, w), dtype=np.uint8, order="F")
            m1[10:90, 10:90] = 1
            m2 = np.zeros((h, w), dtype=np.uint8, order="F")
            m2[50:120, 50:120] = 1
            m3 = np.zeros((h, w), dtype=np.uint8, order="F")
            m3[0:40, 80:128] = 1
            rle2 = mask_utils.encode(m2)
            rle2["counts"] = rle2["counts"].decode()
            uncompressed = {"size": [h, w], "counts": _uncompressed_counts(m1)}
            rle3 = mask_utils.encode(m3)
            rle3["counts"] = rle3["counts"].decode()
            anns += [
                {
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[5],
                    "iscrowd": 0,
                    "segmentation": uncompressed,
                },
                {
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[70],
                    "iscrowd": 0,
                    "segmentation": rle2,
                },
                {
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[11],
                    "iscrowd": 1,
                    "segmentation": rle3,
                },
            ]
        for k, a in enumerate(anns):
            a["id"] = k + 1
            a["area"] = 1.0
            a["bbox"] = [0, 0, 1, 1]
        with open(root / "annotations" / f"instances_{split}{year}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts
