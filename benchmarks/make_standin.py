"""Write a FULL-SCALE stand-in for VOC2012+SBD (Pascal-5i) and COCO 2014 (COCO-20i) in their real layouts.

The stand-in has the real file counts, image sizes, label statistics and annotation-file sizes, so that
scans, episode lists, loaders and memory can be measured at real scale without the real datasets. It
is NOT real data (procedural images and shapes) and must never be committed.

    python benchmarks/make_standin.py --out /work/data/standin [--only voc|coco] [--scale 1.0]

Hard links: to keep disk use and generation time small, only ``--distinct`` (default 400) different
(image, label) pairs are rendered for VOC and ``--distinct`` different JPEGs for COCO; every image id
gets its own directory entry (a hard link to one of them, assigned deterministically), so code that
lists or stats the folders sees 12,031 VOC files per folder and 82,783 + 40,504 COCO images. File
contents therefore repeat (and sit in the page cache after first use): JPEG decode costs are real,
disk-read costs are not. COCO annotations are all distinct (every polygon / RLE is generated).

VOC (``<out>/voc``, root of ``Pascal5iDataModule``): ``JPEGImages/<id>.jpg`` (500 x 375, 25 % portrait
375 x 500) and ``SegmentationClassAug/<id>.png`` (VOC palette) for 10,582 training + 1,449 val ids
(``2008_000123`` style), ``ImageSets/Segmentation/val.txt``. Labels hold 1-4 star-shaped objects
(mean ~2.3) of classes 1..20 (mean ~1.5 classes per image; a later object repeats an earlier class half
the time), areas log-uniform so that most but not all images have a class of >= 2,048 px, and a ~5 px
255 band where labels meet (VOC style).

COCO (``<out>/coco``, root of ``Coco20iDataModule(year=2014)``): ``annotations/instances_train2014.json``
(82,783 images) and ``instances_val2014.json`` (40,504), ~7 annotations per image (negative binomial,
clipped to 0..20) over the 80 real category ids with real names and a Zipf-like frequency (person
~30 %). Annotations: polygons of 1-3 parts with 6-30 vertices each (most), compressed RLE (~1.5 %),
crowd regions with uncompressed RLE like the real files (~1 %, ``iscrowd=1``); areas log-uniform from
20 px to half the image (~44 % small, ~25 % medium, ~31 % large by COCO's 32^2 / 96^2 bounds). Images
are 640 x 480, 480 x 640, 640 x 427 or 427 x 640 JPEGs ``train2014/COCO_train2014_%012d.jpg`` and
``val2014/COCO_val2014_%012d.jpg``. The JSONs are written streaming, from per-chunk fragments.

Idempotent: each part has ``standin_manifest.json`` with its parameters; a second run with the same
parameters does nothing and says so (``--force`` rebuilds). Atomic: each part is built in a hidden
sibling folder and renamed into place (an interrupted run leaves no half-written dataset). Work is
spread over ``--jobs`` processes (default: all cores); the output does not depend on ``--jobs``.
``--scale 0.01`` writes a proportionally small set for smoke tests (at least 200 VOC / 800 COCO ids per
split; the first 640 images of each COCO split carry one large object of class ``k % 80`` on top, so
that every class pool holds a few images at any scale).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from datamodules.cache import swap_in_dir
from datamodules.fake import COCO_CATEGORY_IDS
from fewshot_seg.label_maps import voc_palette

GENERATOR_VERSION = 1
VOC_TRAIN, VOC_VAL = 10_582, 1_449
COCO_TRAIN, COCO_VAL = 82_783, 40_504
MIN_IDS = {"voc": 200, "coco": 800}  # per split, whatever the scale (class pools need a few images each)
COCO_COVER = 8  # the first 80 * COCO_COVER images of a split each get one large object of class k % 80
COCO_CHUNK = 1_000  # images per annotation chunk (part of the generator: chunks seed their own RNG)
MANIFEST = "standin_manifest.json"

_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
)
COCO_NAMES = _NAMES.split()
# Supercategory of each run of names above (real COCO grouping).
_SUPER = [("person", 1), ("vehicle", 8), ("outdoor", 5), ("animal", 10), ("accessory", 5), ("sports", 10),
          ("kitchen", 7), ("food", 10), ("furniture", 6), ("electronic", 6), ("appliance", 5),
          ("indoor", 7)]  # fmt: skip
COCO_SUPERCATEGORIES = [s for s, n in _SUPER for _ in range(n)]
assert len(COCO_NAMES) == len(COCO_SUPERCATEGORIES) == len(COCO_CATEGORY_IDS) == 80


# ---- shapes and pictures ---------------------------------------------------------------------------
def star_polygon(
    rng: np.random.Generator, cx: float, cy: float, area: float, nv: int, h: int, w: int
) -> np.ndarray:
    """``[nv, 2]`` float (x, y) vertices of a random star-shaped polygon of about ``area`` px around
    ``(cx, cy)``, clipped to the image (so objects at the border are cut like real ones)."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, nv))
    rad = rng.uniform(0.55, 1.0, nv)
    aspect = np.exp(rng.uniform(-0.6, 0.6))
    x, y = rad * np.cos(ang) * aspect, rad * np.sin(ang) / aspect
    unit = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    s = np.sqrt(area / max(unit, 1e-6))
    pts = np.stack([np.clip(cx + s * x, 0, w), np.clip(cy + s * y, 0, h)], axis=1)
    return pts


def polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _smooth(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], amp: float, ch: int = 3):
    low = rng.normal(0, amp, size=(max(cells[0], 2), max(cells[1], 2), ch)).astype(np.float32)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, ch)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` float32 photo-like clutter: smooth colour regions, mid-frequency detail, grain."""
    img = rng.uniform(70, 180, size=3).astype(np.float32) + _smooth(rng, h, w, (4, 5), 40)
    img += _smooth(rng, h, w, (h // 12, w // 12), 20)
    img += _smooth(rng, h, w, (h // 3, w // 3), 30, 1)
    img += _smooth(rng, h, w, (h // 2, w // 2), 15)
    img += rng.normal(0, 7, size=(h, w, 1)).astype(np.float32)
    return img


def paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Paint a textured object of base ``colour`` into ``img`` where ``mask``."""
    h, w = mask.shape
    tex = colour[None, None, :] + _smooth(rng, h, w, (h // 10, w // 10), 22)
    img[mask] = tex[mask]


def _class_colour(c: int) -> np.ndarray:
    return np.random.default_rng([99, c]).uniform(20, 235, size=3).astype(np.float32)


def voc_boundary(label: np.ndarray, width: int = 5) -> np.ndarray:
    """Set a ~``width`` px 255 band where label values meet (VOC style); returns ``label``."""
    edge = np.zeros(label.shape, dtype=np.uint8)
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    band = cv2.dilate(edge, np.ones((width, width), np.uint8)) > 0
    label[band] = 255
    return label


def render_voc_pair(i: int, seed: int, out_dir: str) -> dict:
    """Distinct VOC pair ``i``: writes ``voc_<i>.jpg`` / ``voc_<i>.png`` in ``out_dir``; returns stats."""
    rng = np.random.default_rng([seed, 0, i])
    h, w = (500, 375) if rng.random() < 0.25 else (375, 500)
    img = background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15]))
    classes = [i % 20 + 1]  # the main class cycles, so every class gets its share of ids at any scale
    for _ in range(n - 1):
        classes.append(int(rng.choice(classes)) if rng.random() < 0.5 else int(rng.integers(1, 21)))
    for k, c in enumerate(classes):
        frac = (
            np.exp(rng.uniform(np.log(0.004), np.log(0.45)))
            if k == 0
            else np.exp(rng.uniform(np.log(0.002), np.log(0.3)))
        )
        area = frac * h * w
        r = np.sqrt(area / np.pi)
        cx, cy = rng.uniform(0.3 * r, w - 0.3 * r), rng.uniform(0.3 * r, h - 0.3 * r)
        pts = star_polygon(rng, cx, cy, area, int(rng.integers(8, 25)), h, w)
        mask = np.zeros((h, w), dtype=np.uint8)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        mask = mask.astype(bool)
        paint(img, mask, _class_colour(c), rng)
        label[mask] = c
    voc_boundary(label)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(Path(out_dir) / f"voc_{i}.jpg", quality=90)
    png = Image.fromarray(label, mode="P")
    png.putpalette(voc_palette())
    png.save(Path(out_dir) / f"voc_{i}.png")
    counts = np.bincount(label.ravel(), minlength=256)[1:255]
    return {
        "objects": n,
        "classes": int(np.count_nonzero(counts)),
        "has_2048": bool((counts >= 2048).any()),
        "jpg_bytes": os.path.getsize(Path(out_dir) / f"voc_{i}.jpg"),
    }


COCO_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427))  # (h, w)
COCO_SIZE_P = (0.45, 0.2, 0.25, 0.1)


def coco_jpeg_size(j: int, seed: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, 1, j])
    return COCO_SIZES[int(rng.choice(len(COCO_SIZES), p=COCO_SIZE_P))]


def render_coco_jpeg(j: int, seed: int, out_dir: str) -> dict:
    """Distinct COCO JPEG ``j`` (clutter + a few textured shapes) as ``coco_<j>.jpg`` in ``out_dir``."""
    h, w = coco_jpeg_size(j, seed)
    rng = np.random.default_rng([seed, 2, j])
    img = background(rng, h, w)
    for _ in range(int(rng.integers(2, 9))):
        area = np.exp(rng.uniform(np.log(200), np.log(0.3 * h * w)))
        pts = star_polygon(rng, rng.uniform(0, w), rng.uniform(0, h), area, int(rng.integers(6, 25)), h, w)
        mask = np.zeros((h, w), dtype=np.uint8)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        paint(img, mask.astype(bool), rng.uniform(20, 235, size=3).astype(np.float32), rng)
    path = Path(out_dir) / f"coco_{j}.jpg"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return {"jpg_bytes": os.path.getsize(path)}


# ---- COCO annotations --------------------------------------------------------------------------------
def category_weights(seed: int) -> np.ndarray:
    """Frequencies over the 80 categories: person ~30 %, the others Zipf-like in a fixed random order."""
    rng = np.random.default_rng([seed, 3])
    rank = rng.permutation(79) + 1
    rest = 1.0 / rank**0.9
    weights = np.concatenate([[0.3], 0.7 * rest / rest.sum()])
    return weights / weights.sum()


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of a ``[h, w]`` {0, 1} mask (column-major runs, zeros first)."""
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    counts = runs.tolist()
    return [0, *counts] if flat[0] else counts


def _r2(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def coco_annotations(
    rng: np.random.Generator,
    image_id: int,
    h: int,
    w: int,
    first_ann_id: int,
    weights: np.ndarray,
    cover: int | None = None,
) -> tuple[list[dict], dict]:
    """The annotations of one image and a few counters. With ``cover`` (a category index), the last
    annotation (painted on top) is a large polygon of that category, so that every class pool has a few
    images even in a small stand-in."""
    n = min(20, int(rng.negative_binomial(4, 4 / (4 + 7.3))))
    if cover is not None:
        n = max(n, 1)
    stats = {"anns": n, "poly": 0, "rle": 0, "crowd": 0, "vertices": 0, "parts": 0, "small": 0, "medium": 0}
    if n == 0:
        return [], stats
    n_cats = min(n, 1 + int(rng.poisson(1.9)))
    cats = rng.choice(80, size=n_cats, replace=False, p=weights)
    cat_p = np.linspace(2.0, 1.0, n_cats)
    cat_p /= cat_p.sum()
    anns = []
    for k in range(n):
        cid = COCO_CATEGORY_IDS[int(cats[rng.choice(n_cats, p=cat_p)])]
        u = rng.random()
        crowd = u < 0.01
        area = float(np.exp(rng.uniform(np.log(2000 if crowd else 20), np.log(0.5 * h * w))))
        r = np.sqrt(area / np.pi)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if cover is not None and k == n - 1:
            cid, u, crowd = COCO_CATEGORY_IDS[cover], 1.0, False
            area = float(np.exp(rng.uniform(np.log(6000), np.log(0.3 * h * w))))
            r = np.sqrt(area / np.pi)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        size_t = (np.log(area) - np.log(20)) / (np.log(0.5 * h * w) - np.log(20))
        nv = int(np.clip(round(6 + 24 * size_t + rng.normal(0, 3)), 6, 30))
        n_parts = int(rng.choice([1, 2, 3], p=[0.85, 0.1, 0.05]))
        parts = []
        for p in range(n_parts):
            ox, oy = (0.0, 0.0) if p == 0 else rng.normal(0, 1.2 * r, size=2)
            part_area = area * (0.7 if p == 0 and n_parts > 1 else (0.3 / max(n_parts - 1, 1)) if p else 1.0)
            parts.append(
                star_polygon(rng, cx + ox, cy + oy, part_area, nv if p == 0 else max(6, nv // 2), h, w)
            )
        ann = {"segmentation": None, "area": 0.0, "iscrowd": int(crowd), "image_id": image_id,
               "bbox": None, "category_id": cid, "id": first_ann_id + k}  # fmt: skip
        if crowd or u < 0.025:  # RLE: crowd (uncompressed, as in the real files) or compressed
            mask = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(mask, [np.round(pt).astype(np.int32) for pt in parts], 1)
            rle = mask_utils.encode(np.asfortranarray(mask))
            ann["area"] = float(mask_utils.area(rle))
            ann["bbox"] = _r2(mask_utils.toBbox(rle))
            if crowd:
                ann["segmentation"] = {"counts": uncompressed_counts(mask), "size": [h, w]}
                stats["crowd"] += 1
            else:
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                stats["rle"] += 1
        else:
            ann["segmentation"] = [_r2(pt.ravel()) for pt in parts]
            ann["area"] = round(sum(polygon_area(pt) for pt in parts), 2)
            allp = np.concatenate(parts)
            x0, y0 = allp.min(axis=0)
            x1, y1 = allp.max(axis=0)
            ann["bbox"] = _r2([x0, y0, x1 - x0, y1 - y0])
            stats["poly"] += 1
            stats["vertices"] += sum(len(pt) for pt in parts)
            stats["parts"] += n_parts
        stats["small"] += ann["area"] < 32**2
        stats["medium"] += 32**2 <= ann["area"] < 96**2
        anns.append(ann)
    return anns, stats


def coco_chunk(task: tuple) -> dict:
    """Images ``[start, stop)`` of a split: writes ``<parts>/<split>_<chunk>.images`` / ``.anns``
    (comma-separated JSON objects, no brackets) and returns summed counters."""
    parts_dir, split, chunk, ids, distinct, seed = task
    rng = np.random.default_rng([seed, 4, 0 if split == "train" else 1, chunk])
    weights = category_weights(seed)
    images, anns = [], []
    total: dict[str, int] = {}
    first = (0 if split == "train" else 50_000_000) + chunk * COCO_CHUNK * 21 + 1
    for pos, (image_id, j) in enumerate(zip(ids, distinct)):
        k = chunk * COCO_CHUNK + pos
        h, w = coco_jpeg_size(int(j), seed)
        name = f"COCO_{split}2014_{int(image_id):012d}.jpg"
        images.append({"license": int(rng.integers(1, 9)), "file_name": name,
                       "coco_url": f"http://images.cocodataset.org/{split}2014/{name}", "height": h,
                       "width": w, "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": f"http://farm{int(rng.integers(1, 10))}.staticflickr.com/standin/{name}",
                       "id": int(image_id)})  # fmt: skip
        cover = k % 80 if k < 80 * COCO_COVER else None
        a, st = coco_annotations(rng, int(image_id), h, w, first, weights, cover)
        first += len(a)
        anns.extend(a)
        for k, v in st.items():
            total[k] = total.get(k, 0) + int(v)
        total["empty"] = total.get("empty", 0) + (len(a) == 0)
    sep = (",", ":")
    base = Path(parts_dir) / f"{split}_{chunk:05d}"
    Path(f"{base}.images").write_text(",".join(json.dumps(x, separators=sep) for x in images))
    Path(f"{base}.anns").write_text(",".join(json.dumps(x, separators=sep) for x in anns))
    total["images"] = len(images)
    return total


def write_coco_json(path: Path, parts_dir: Path, split: str, n_chunks: int) -> None:
    """Stream the chunk fragments into one instances JSON (images, then annotations)."""
    sep = (",", ":")
    info = {"description": "COCO 2014 layout STAND-IN (procedural, not real data)", "version": "1.0",
            "year": 2014, "contributor": "fewshot_seg benchmarks/make_standin.py",
            "date_created": "2015-01-01 00:00:00", "url": ""}  # fmt: skip
    licenses = [{"url": "", "id": i, "name": f"license {i}"} for i in range(1, 9)]
    categories = [
        {"supercategory": s, "id": cid, "name": n.replace("_", " ")}
        for cid, n, s in zip(COCO_CATEGORY_IDS, COCO_NAMES, COCO_SUPERCATEGORIES)
    ]
    with open(path, "w") as f:
        f.write('{"info":' + json.dumps(info, separators=sep) + ',"images":[')
        _copy_fragments(f, parts_dir, split, "images", n_chunks)
        f.write('],"licenses":' + json.dumps(licenses, separators=sep) + ',"annotations":[')
        _copy_fragments(f, parts_dir, split, "anns", n_chunks)
        f.write('],"categories":' + json.dumps(categories, separators=sep) + "}")


def _copy_fragments(f, parts_dir: Path, split: str, key: str, n_chunks: int) -> None:
    first = True
    for c in range(n_chunks):
        frag = parts_dir / f"{split}_{c:05d}.{key}"
        if frag.stat().st_size:
            if not first:
                f.write(",")
            with open(frag) as g:
                shutil.copyfileobj(g, f, 1 << 22)
            first = False
        frag.unlink()


# ---- building a part ---------------------------------------------------------------------------------
def scaled(n: int, scale: float, part: str) -> int:
    return n if scale == 1.0 else max(MIN_IDS[part], round(n * scale))


def voc_ids(n_train: int, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct VOC-style ids (``2008_000123``), sorted; a random ``n_val`` of them are val."""
    rng = np.random.default_rng([seed, 5])
    n = n_train + n_val
    codes = rng.choice(5 * 10_000, size=n, replace=False)
    ids = sorted(f"{2007 + c // 10_000}_{c % 10_000:06d}" for c in codes)
    val = sorted(ids[int(k)] for k in rng.choice(n, size=n_val, replace=False))
    return ids, val


def _link_all(pairs, desc: str) -> None:
    for src, dst in tqdm(pairs, desc=desc, unit="file", mininterval=2.0):
        os.link(src, dst)


def build_voc(tmp: Path, params: dict, pool: mp.pool.Pool) -> dict:
    n_train, n_val, seed, distinct = (
        params["num_train"],
        params["num_val"],
        params["seed"],
        params["distinct"],
    )
    ids, val = voc_ids(n_train, n_val, seed)
    work = tmp / "_distinct"
    for d in (work, tmp / "JPEGImages", tmp / "SegmentationClassAug", tmp / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True)
    tasks = [(i, seed, str(work)) for i in range(distinct)]
    stats = list(
        tqdm(
            pool.imap(_render_voc_star, tasks, chunksize=4),
            total=distinct,
            desc="voc render",
            unit="pair",
            mininterval=2.0,
        )
    )
    order = np.random.default_rng([seed, 6]).permutation(len(ids))
    which = np.empty(len(ids), dtype=np.int64)
    which[order] = np.arange(len(ids)) % distinct  # round-robin over a shuffled id order
    links = []
    for image_id, j in zip(ids, which):
        links.append((work / f"voc_{j}.jpg", tmp / "JPEGImages" / f"{image_id}.jpg"))
        links.append((work / f"voc_{j}.png", tmp / "SegmentationClassAug" / f"{image_id}.png"))
    _link_all(links, "voc links")
    (tmp / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val) + "\n")
    shutil.rmtree(work)
    w = np.bincount(which, minlength=distinct)  # weight each distinct pair by its number of ids

    def mean(key: str) -> float:
        return float(np.dot(w, [s[key] for s in stats]) / w.sum())

    return {
        "objects per image": round(mean("objects"), 2),
        "classes per image": round(mean("classes"), 2),
        "images with a class >= 2,048 px": f"{100 * mean('has_2048'):.1f} %",
        "mean JPEG size": f"{mean('jpg_bytes') / 1024:.0f} KiB",
    }


def _render_voc_star(args):
    return render_voc_pair(*args)


def _render_coco_star(args):
    return render_coco_jpeg(*args)


def build_coco(tmp: Path, params: dict, pool: mp.pool.Pool) -> dict:
    seed, distinct = params["seed"], params["distinct"]
    counts = {"train": params["num_train"], "val": params["num_val"]}
    work = tmp / "_distinct"
    parts = tmp / "_parts"
    for d in (work, parts, tmp / "annotations", tmp / "train2014", tmp / "val2014"):
        d.mkdir(parents=True)
    jpeg_stats = list(
        tqdm(
            pool.imap(_render_coco_star, [(j, seed, str(work)) for j in range(distinct)], chunksize=4),
            total=distinct,
            desc="coco render",
            unit="jpg",
            mininterval=2.0,
        )
    )
    rng = np.random.default_rng([seed, 7])
    all_ids = rng.choice(np.arange(1, 600_000), size=sum(counts.values()), replace=False)
    split_ids = {"train": all_ids[: counts["train"]], "val": all_ids[counts["train"] :]}
    summary: dict = {"mean JPEG size": f"{np.mean([s['jpg_bytes'] for s in jpeg_stats]) / 1024:.0f} KiB"}
    for split in ("train", "val"):
        ids = split_ids[split]
        code = 0 if split == "train" else 1
        which = np.random.default_rng([seed, 8, code]).permutation(len(ids)) % distinct
        n_chunks = (len(ids) + COCO_CHUNK - 1) // COCO_CHUNK
        tasks = [
            (str(parts), split, c, ids[c * COCO_CHUNK : (c + 1) * COCO_CHUNK].tolist(),
             which[c * COCO_CHUNK : (c + 1) * COCO_CHUNK].tolist(), seed)
            for c in range(n_chunks)
        ]  # fmt: skip
        total: dict[str, int] = {}
        for st in tqdm(
            pool.imap_unordered(coco_chunk, tasks), total=n_chunks, desc=f"coco {split} anns", mininterval=2.0
        ):
            for k, v in st.items():
                total[k] = total.get(k, 0) + v
        path = tmp / "annotations" / f"instances_{split}2014.json"
        t = time.perf_counter()
        write_coco_json(path, parts, split, n_chunks)
        print(
            f"  wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.1f} s"
        )
        links = [
            (work / f"coco_{j}.jpg", tmp / f"{split}2014" / f"COCO_{split}2014_{int(i):012d}.jpg")
            for i, j in zip(ids, which)
        ]
        _link_all(links, f"coco {split} links")
        n_anns = max(total["anns"], 1)
        summary[f"{split}: annotations per image"] = round(total["anns"] / total["images"], 2)
        summary[f"{split}: images without annotations"] = total["empty"]
        summary[f"{split}: polygon / compressed RLE / crowd (uncompressed RLE)"] = (
            f"{100 * total['poly'] / n_anns:.1f} / {100 * total['rle'] / n_anns:.1f} / "
            f"{100 * total['crowd'] / n_anns:.1f} %"
        )
        summary[f"{split}: polygon parts, vertices per part"] = (
            f"{total['parts'] / max(total['poly'], 1):.2f}, {total['vertices'] / max(total['parts'], 1):.1f}"
        )
        summary[f"{split}: small / medium / large areas"] = (
            f"{100 * total['small'] / n_anns:.0f} / {100 * total['medium'] / n_anns:.0f} / "
            f"{100 * (n_anns - total['small'] - total['medium']) / n_anns:.0f} %"
        )
    shutil.rmtree(work)
    shutil.rmtree(parts)
    return summary


def disk_usage(root: Path) -> tuple[int, int, int]:
    """(files, distinct inodes, bytes on disk counting each inode once) under ``root``."""
    files, seen, size = 0, set(), 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return files, len(seen), size


def build_part(part: str, out: Path, params: dict, jobs: int, force: bool) -> dict | None:
    """Build ``<out>/<part>`` atomically unless its manifest already holds ``params``; None if skipped."""
    root = out / part
    try:
        old_params = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        old_params = None
    if old_params == params and not force:
        print(f"{part}: {root} already holds a stand-in with these parameters ({MANIFEST}); nothing to do")
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{part}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        with mp.get_context("fork").Pool(jobs) as pool:
            summary = (build_voc if part == "voc" else build_coco)(tmp, params, pool)
        (tmp / MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
        swap_in_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": time.perf_counter() - t0, "summary": summary}


def part_params(part: str, scale: float, seed: int, distinct: int) -> dict:
    n_train, n_val = (VOC_TRAIN, VOC_VAL) if part == "voc" else (COCO_TRAIN, COCO_VAL)
    n_train, n_val = scaled(n_train, scale, part), scaled(n_val, scale, part)
    return {
        "generator": "benchmarks/make_standin.py",
        "version": GENERATOR_VERSION,
        "part": part,
        "scale": scale,
        "seed": seed,
        "num_train": n_train,
        "num_val": n_val,
        "distinct": min(distinct, n_train + n_val),
        "coco_chunk": COCO_CHUNK if part == "coco" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives voc/ and coco/")
    p.add_argument("--only", choices=["voc", "coco"], default=None)
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the real id counts (at least 200 VOC / 800 COCO ids per split)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distinct", type=int, default=400, help="distinct rendered images (ids are hard links)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    args = p.parse_args()
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    out = Path(args.out)
    parts = [args.only] if args.only else ["voc", "coco"]
    rows = []
    for part in parts:
        params = part_params(part, args.scale, args.seed, args.distinct)
        print(f"{part}: {params['num_train']:,} train + {params['num_val']:,} val ids, "
              f"{params['distinct']} distinct rendered images (the rest are hard links)")  # fmt: skip
        built = build_part(part, out, params, args.jobs, args.force)
        root = out / part
        if built is not None:
            for k, v in built["summary"].items():
                print(f"  {k}: {v}")
        subdirs = (
            ["JPEGImages", "SegmentationClassAug", "ImageSets"]
            if part == "voc"
            else ["annotations", "train2014", "val2014"]
        )
        for sub in subdirs:
            files, inodes, size = disk_usage(root / sub)
            rows.append((f"{part}/{sub}", files, inodes, size, None))
        files, inodes, size = disk_usage(root)
        rows.append((f"{part} (all)", files, inodes, size, built["seconds"] if built else None))
    for sub in ("annotations/instances_train2014.json", "annotations/instances_val2014.json"):
        f = out / "coco" / sub
        if "coco" in parts and f.exists():
            print(f"coco/{sub}: {f.stat().st_size / 2**20:.1f} MiB")
    print(
        f"\nStand-in under {out} (scale {args.scale}); image and label files are HARD LINKS to "
        f"{args.distinct} distinct rendered files per part; disk counts each inode once.\n"
    )
    print("| folder | files | distinct files | disk size | build time |")
    print("|---|---:|---:|---:|---:|")
    for name, files, inodes, size, secs in rows:
        t = (
            "skipped (present)"
            if secs is None and name.endswith("(all)")
            else (f"{secs:.0f} s" if secs else "")
        )
        print(f"| {name} | {files:,} | {inodes:,} | {size / 2**20:,.1f} MiB | {t} |")


if __name__ == "__main__":
    main()
