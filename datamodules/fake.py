"""Tiny datasets in the real on-disk formats, for tests and benchmarks (not for training).

``make_fake_voc`` writes VOC2012/SBD layout (JPEG images, palette label PNGs with 255
boundaries, val.txt); ``make_fake_coco`` writes COCO layout (JPEGs + instance JSON with polygon,
RLE and crowd annotations over the real 80 category ids). The benchmark writers follow the published
layouts of docs/benchmarks.md: ``make_fake_fss`` (FSS-1000 + HSNet split files), ``make_fake_lvis``
(LVIS v1 JSON + COCO 2017 image folders), ``make_fake_deepglobe``, ``make_fake_isic`` and
``make_fake_chestxray`` (PATNet's). A user's own data: ``make_fake_coco_format`` (a CVAT-style COCO
export with non-contiguous category ids) and ``make_fake_mask_folder`` (class-index PNG masks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from fewshot_seg.label_maps import voc_palette

from .synthetic import add_boundary

# The 80 category ids of COCO (1..90 with gaps), so rank-vs-id mapping is exercised.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
# Their names, in id order (as in the COCO instance JSONs).
COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


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
    real_names: bool = False,
) -> Path:
    """COCO-format dataset: every class in ``per_class`` images of each split (four quadrant
    polygons of >= 2,048 px per image), plus per split one image holding an uncompressed RLE, a
    compressed RLE overlapping it (later overwrites earlier), and a crowd region. Categories are named
    ``cat<id>``, or with ``real_names`` as in COCO. Returns ``root``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    qh, qw = h // 2, w // 2
    names = COCO_CATEGORY_NAMES if real_names else [f"cat{cid}" for cid in COCO_CATEGORY_IDS]
    categories = [
        {"id": cid, "name": name, "supercategory": "x"}
        for cid, name in zip(COCO_CATEGORY_IDS, names, strict=True)
    ]
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


# ---- benchmark layouts ---------------------------------------------------------------------------
FSS_CLASS_NAMES = {
    "train": ("abe's_flyingfish", "american_alligator", "bus", "cathedrale_paris", "fish_eagle"),
    "val": ("delta_wing", "rice_cooker"),
    "test": ("bloodhound", "hotel_slipper", "reflex_camera"),
}


def _binary_mask(h: int, w: int, rng: np.random.Generator, soft_edge: bool = True) -> np.ndarray:
    """``[h, w]`` uint8 0 / 255 rectangle; with ``soft_edge`` a ring of 100 (background) outside and 200
    (object) inside, as anti-aliased masks have, so the 128 threshold matters."""
    m = np.zeros((h, w), dtype=np.uint8)
    y0, x0 = int(rng.integers(2, h // 4)), int(rng.integers(2, w // 4))
    y1, x1 = int(rng.integers(h // 2, h - 2)), int(rng.integers(w // 2, w - 2))
    if soft_edge:
        m[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 100
    m[y0:y1, x0:x1] = 255
    if soft_edge:
        m[y0, x0:x1] = 200
    return m


def _save_rgb_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2)).save(path)


def make_fake_fss(
    root: str | os.PathLike,
    per_class: int = 5,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
    hsnet_split_names: bool = False,
) -> Path:
    """FSS-1000 layout: ``<class>/<n>.jpg`` + ``<n>.png`` (RGB black-and-white masks with soft edges),
    n = 1..per_class, for the classes of :data:`FSS_CLASS_NAMES`, and ``splits/{train,val,test}.txt``
    (``trn.txt`` for train with ``hsnet_split_names``). The last image of the first test class has an
    empty mask. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, classes in FSS_CLASS_NAMES.items():
        name = "trn.txt" if split == "train" and hsnet_split_names else f"{split}.txt"
        (root / "splits" / name).write_text("".join(f"{c}\n" for c in reversed(classes)))  # unsorted
        for c in classes:
            (root / c).mkdir(exist_ok=True)
            for n in range(1, per_class + 1):
                Image.fromarray(_noise_image(h, w, rng)).save(root / c / f"{n}.jpg")
                mask = _binary_mask(h, w, rng)
                if split == "test" and c == classes[0] and n == per_class:
                    mask[:] = 0
                _save_rgb_mask(root / c / f"{n}.png", mask)
    return root


def make_fake_deepglobe(
    root: str | os.PathLike, tiles: int = 5, size: tuple[int, int] = (48, 48), seed: int = 0
) -> Path:
    """PATNet's Deepglobe layout: ``<c>/test/origin/<tile>.jpg`` + ``<c>/test/groundtruth/<tile>.png``
    (3-channel black-and-white, as OpenCV wrote them) for c = 1..6; tile ``<k>_sat_<ij>`` is in the
    folders of the classes it shows (each class in ``tiles`` tiles, tiles shared across classes)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    images = {f"{100 + k}_sat_{k % 6}{k // 6}": _noise_image(h, w, rng) for k in range(tiles + 5)}
    names = sorted(images)
    for c in range(1, 7):
        origin, truth = root / str(c) / "test" / "origin", root / str(c) / "test" / "groundtruth"
        origin.mkdir(parents=True, exist_ok=True)
        truth.mkdir(parents=True, exist_ok=True)
        for name in names[c - 1 : c - 1 + tiles]:
            Image.fromarray(images[name]).save(origin / f"{name}.jpg")
            _save_rgb_mask(truth / f"{name}.png", _binary_mask(h, w, rng, soft_edge=False))
    return root


def make_fake_isic(
    root: str | os.PathLike,
    per_class: tuple[int, int, int] = (3, 5, 2),
    size: tuple[int, int] = (36, 44),
    seed: int = 0,
) -> Path:
    """PATNet's ISIC layout: ``ISIC2018_Task1-2_Training_Input/<1|2|3>/ISIC_<7 digits>.jpg`` and
    ``ISIC2018_Task1_Training_GroundTruth/ISIC_<7 digits>_segmentation.png`` (greyscale 0 / 255)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    truth = root / "ISIC2018_Task1_Training_GroundTruth"
    truth.mkdir(parents=True, exist_ok=True)
    k = 0
    for c, n in enumerate(per_class, start=1):
        folder = root / "ISIC2018_Task1-2_Training_Input" / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            stem = f"ISIC_{k:07d}"
            Image.fromarray(_noise_image(h, w, rng)).save(folder / f"{stem}.jpg")
            Image.fromarray(_binary_mask(h, w, rng, soft_edge=False)).save(truth / f"{stem}_segmentation.png")
            k += 1
    return root


def make_fake_chestxray(
    root: str | os.PathLike, n: int = 5, size: tuple[int, int] = (40, 36), seed: int = 0
) -> Path:
    """PATNet's LungSegmentation layout: ``CXR_png/<id>.png`` (greyscale X-rays) and ``masks/<id>_mask.png``
    (Shenzhen naming) for ``n`` ids, one Montgomery mask named ``<id>.png``, and one X-ray without a mask
    (as the published set has)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "CXR_png").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = [f"CHNCXR_{k + 1:04d}_{k % 2}" for k in range(n)] + ["MCUCXR_0001_0", "MCUCXR_0002_1"]
    for i in ids:
        Image.fromarray(_noise_image(h, w, rng)[:, :, 0]).save(root / "CXR_png" / f"{i}.png")
    for i in ids[:n]:
        Image.fromarray(_binary_mask(h, w, rng, soft_edge=False)).save(root / "masks" / f"{i}_mask.png")
    Image.fromarray(_binary_mask(h, w, rng, soft_edge=False)).save(root / "masks" / f"{ids[n]}.png")
    return root  # ids[n + 1] has no mask


LVIS_FAKE_CATEGORIES = 24
"""Categories 1..22 are in 3 val images each by default (eligible), 23 in one (not eligible), 24 in none."""
LVIS_FAKE_IMAGES_PER_CATEGORY = 3


def _lvis_record(image_id: int, folder: str, h: int, w: int) -> dict:
    name = f"{image_id:012d}.jpg"
    return {
        "id": image_id,
        "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
        "height": h,
        "width": w,
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
    }


def make_fake_lvis(
    root: str | os.PathLike,
    size: tuple[int, int] = (64, 80),
    seed: int = 0,
    val_images: Mapping[int, int] | None = None,
) -> Path:
    """LVIS v1 layout: ``annotations/lvis_v1_{train,val}.json`` over :data:`LVIS_FAKE_CATEGORIES` categories
    and COCO 2017 image folders ``train2017/``, ``val2017/`` (one val image lives in ``train2017/``, as
    LVIS v1 val images may; its ``coco_url`` says so). Images hold 4 categories as quadrant polygons;
    one val image (the last) has two instances of category 1 (a polygon and a compressed RLE) and an
    instance of category 2 overlapping the first. Training images show every category 3 times.
    ``val_images`` sets the number of val images of some of the categories 1..22 (default 3 each), e.g.
    for shot-dependent folds; the default tree is the same as without it."""
    if not set(val_images or {}) <= set(range(1, 23)):
        raise ValueError(f"val_images: only categories 1..22 can be set, got {sorted(val_images or {})}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    qh, qw = h // 2, w // 2
    categories = [
        {"id": c, "name": f"lvis_thing_{c:02d}", "synonyms": [], "frequency": "r", "image_count": 0,
         "instance_count": 0, "synset": f"thing.n.{c:02d}", "def": "a thing"}
        for c in range(1, LVIS_FAKE_CATEGORIES + 1)
    ]  # fmt: skip
    for split in ("train", "val"):
        cats = range(1, LVIS_FAKE_CATEGORIES + 1) if split == "train" else range(1, 23)
        n = dict.fromkeys(cats, LVIS_FAKE_IMAGES_PER_CATEGORY)
        if split == "val":
            n.update(val_images or {})
        slots = [c for r in range(max(n.values())) for c in cats if n[c] > r]
        if split == "val":
            slots.append(23)  # last, after the rounds: the default tree is the one made before val_images
        images, anns = [], []
        base = 1 if split == "train" else 500000
        for k in range((len(slots) + 3) // 4):
            image_id = base + 3 * k
            folder = "train2017" if split == "train" or k == 1 else "val2017"
            images.append(_lvis_record(image_id, folder, h, w))
            for q, c in enumerate(slots[4 * k : 4 * k + 4]):
                y0, x0 = (q // 2) * qh + 2, (q % 2) * qw + 2
                anns.append(
                    {"image_id": image_id, "category_id": c, "segmentation": _polygon(y0, x0, qh - 4, qw - 4)}
                )
        if split == "val":
            image_id = base + 3 * len(images)
            images.append(_lvis_record(image_id, "val2017", h, w))
            second = np.zeros((h, w), dtype=np.uint8, order="F")
            second[h - 12 : h - 2, 2:14] = 1
            rle = mask_utils.encode(second)
            rle["counts"] = rle["counts"].decode()
            anns += [
                {"image_id": image_id, "category_id": 1, "segmentation": _polygon(4, 4, h // 2, w // 2)},
                {"image_id": image_id, "category_id": 1, "segmentation": rle},
                {
                    "image_id": image_id,
                    "category_id": 2,
                    "segmentation": _polygon(h // 4, w // 4, h // 2, w // 2),
                },
            ]
        for a_id, a in enumerate(anns, start=1):
            a.update(id=a_id, area=1.0, bbox=[0, 0, 1, 1])
        for im in images:
            folder = root / im["coco_url"].split("/")[-2]
            folder.mkdir(exist_ok=True)
            Image.fromarray(_noise_image(h, w, rng)).save(folder / im["coco_url"].split("/")[-1])
        with open(root / "annotations" / f"lvis_v1_{split}.json", "w") as f:
            json.dump(
                {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": categories},
                f,
            )
    return root


# ---- a user's own data --------------------------------------------------------------------------
OWN_CLASSES = {3: "scratch", 17: "dent", 42: "crack", 300: "rust"}
"""The categories of :func:`make_fake_coco_format` (non-contiguous ids; label order = id order)."""


def _own_layout(n: int, h: int, w: int) -> list[list[tuple[int, tuple[int, int, int, int]]]]:
    """Per image k, two (class slot, (y0, x0, height, width)) objects: slots k % 4 and (k + 1) % 4, so
    every slot is in half of the images and slot 3's images (k % 4 in {2, 3}) are half of them."""
    boxes = ((2, 2, h // 2 - 4, w - 4), (h // 2 + 2, 2, h // 2 - 4, w - 4))
    return [[(k % 4, boxes[0]), ((k + 1) % 4, boxes[1])] for k in range(n)]


def make_fake_coco_format(
    root: str | os.PathLike, n: int = 16, size: tuple[int, int] = (48, 64), seed: int = 0
) -> Path:
    """A CVAT-style COCO export: ``images/img_<k>.jpg`` + ``annotations/instances_default.json`` with the
    categories :data:`OWN_CLASSES` (ids 3, 17, 42, 300). Each image holds two objects (see
    ``_own_layout``), written in turn as a polygon, a compressed RLE and an uncompressed RLE.
    Returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    ids = sorted(OWN_CLASSES)
    images, anns = [], []
    for k, objects in enumerate(_own_layout(n, h, w)):
        image_id = 10 * k + 5  # not 1..n: ids are the JSON's
        name = f"img_{k:03d}.jpg"
        Image.fromarray(_noise_image(h, w, rng)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for slot, (y0, x0, hh, ww) in objects:
            mask = np.zeros((h, w), dtype=np.uint8, order="F")
            mask[y0 : y0 + hh, x0 : x0 + ww] = 1
            kind = (k + slot) % 3
            if kind == 0:
                segm: object = _polygon(y0, x0, hh, ww)
            elif kind == 1:
                segm = mask_utils.encode(mask)
                segm["counts"] = segm["counts"].decode()  # type: ignore[index]
            else:
                segm = {"size": [h, w], "counts": _uncompressed_counts(mask)}
            anns.append({"image_id": image_id, "category_id": ids[slot], "iscrowd": 0, "segmentation": segm})
    for a_id, a in enumerate(anns, start=1):
        a.update(id=a_id, area=1.0, bbox=[0, 0, 1, 1])
    categories = [{"id": cid, "name": OWN_CLASSES[cid], "supercategory": ""} for cid in ids]
    with open(root / "annotations" / "instances_default.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return root


MASK_FOLDER_CLASSES = ("cell", "nucleus", "debris", "vessel")


def make_fake_mask_folder(
    root: str | os.PathLike, n: int = 16, size: tuple[int, int] = (48, 64), seed: int = 0
) -> Path:
    """The mask-folder layout: ``images/s_<k>.png``, ``masks/s_<k>.png`` (greyscale class indices, a 255
    band between the objects) and ``classes.txt`` (a "background" line, then :data:`MASK_FOLDER_CLASSES`).
    Objects as in :func:`make_fake_coco_format`, class = slot + 1. Returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for k, objects in enumerate(_own_layout(n, h, w)):
        label = np.zeros((h, w), dtype=np.uint8)
        for slot, (y0, x0, hh, ww) in objects:
            label[y0 : y0 + hh, x0 : x0 + ww] = slot + 1
        label[h // 2 - 1 : h // 2 + 1] = 255
        Image.fromarray(_noise_image(h, w, rng)).save(root / "images" / f"s_{k:03d}.png")
        Image.fromarray(label, mode="L").save(root / "masks" / f"s_{k:03d}.png")
    (root / "classes.txt").write_text("background\n" + "".join(f"{c}\n" for c in MASK_FOLDER_CLASSES))
    return root
