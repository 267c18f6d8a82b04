"""Training-loader episodes/s per worker against the decode + augmentation limit, VOC and COCO.

    python benchmarks/data_loader.py --root /work/data/standin [--only voc|coco] [--episodes 96]
        [--repeats 1] [--workers 0 1 2] [--shots 1 5] [--cache-dir DIR]

``--root`` holds ``voc/`` (Pascal5iDataModule) and ``coco/`` (Coco20iDataModule, year 2014), e.g. the
stand-in of ``benchmarks/make_standin.py`` at any ``--scale``. Every figure comes from this one run.

Loader: ``dm.train_dataloader()`` at image_size 480, batch_size 4, fold 0, K = ``--shots``,
``num_workers`` = ``--workers``. The first max(1, w) batches (one per worker: start-up) are not timed;
then ``--episodes`` episodes are timed; median of ``--repeats``. Per worker = episodes/s divided by w
(w = 0: the main process counts as one worker). Class pools come from the class-count cache in
``--cache-dir`` (default: the DataModule's, ``<root>/<dataset>/fewshot_cache``), built once if missing
and not timed.

Limit: the images the loader just used (queries and supports of the timed batches, each once, at most
``--limit-images``), in one process: decode (JPEG with PIL; VOC label PNG with PIL, COCO label rendered
from the instance JSON with pycocotools) and the training pipeline's ops applied once per image
(shortest-edge resize to a random scale of ``default_train_scales(480)``, TrainAugment's colour jitter,
h-flip, a 480 crop with padding, normalisation to float CHW), no sampling logic (no crop re-draws,
no support re-augmentation, no episode assembly, no worker transfer). Written here, not imported, so
it does not share the code paths being measured. Limit episodes/s for K shots = images/s / (K + 1);
ratio = loader per worker / limit.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from _measure import Timer, host_line, markdown_table, median, quiet_warnings, standin_scale
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import Coco20iDataModule, Pascal5iDataModule, TrainAugment, default_train_scales
from datamodules.transforms import TRAIN_IMAGE_PAD
from fewshot_seg.episode import IGNORE_INDEX, PIXEL_MEAN, PIXEL_STD

IMAGE_SIZE = 480
BATCH_SIZE = 4
NAMES = {"voc": "VOC (Pascal5i)", "coco": "COCO 2014 (Coco20i)"}


def make_dm(dataset: str, root: Path, shot: int, workers: int, cache_dir: str | None, length: int):
    kw = {
        "fold": 0,
        "shot": shot,
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE,
        "num_workers": workers,
        "train_episodes": length,
        "cache_dir": cache_dir,
    }
    if dataset == "voc":
        return Pascal5iDataModule(root=str(root / "voc"), **kw)
    return Coco20iDataModule(root=str(root / "coco"), year=2014, **kw)


def loader_rate(dm, workers: int, episodes: int, repeats: int, seen: list[str]) -> float:
    """Median episodes/s of ``dm``'s training loader; appends the ids it used to ``seen``."""
    loader = dm.train_dataloader()
    rates = []
    for _ in range(repeats):
        it = iter(loader)
        for _ in range(max(1, workers)):
            next(it)  # start-up: the first batch of each worker
        n = 0
        with Timer() as t:
            while n < episodes:
                batch = next(it)
                n += batch.batch_size
                for q, sup in zip(batch.query_id, batch.support_ids):
                    seen += [q, *sup]
        rates.append(n / t.seconds)
        del it
    del loader
    return median(rates)


# ---- the limit ---------------------------------------------------------------------------------------
def limit_ops(image_size: int) -> A.Compose:
    """The training pipeline's ops, applied once: TrainAugment's colour jitter (copied from its pipeline
    when it has one, else SPEC's values), shortest-edge scales from ``default_train_scales``."""
    jitter = None
    for t in getattr(getattr(TrainAugment(image_size), "pipeline", None), "transforms", []):
        if isinstance(t, A.ColorJitter):
            jitter = copy.deepcopy(t)
    if jitter is None:
        jitter = A.ColorJitter(brightness=0.2, contrast=0.3, saturation=0.3, hue=0.03, p=0.8)
    ops = A.Compose(
        [
            A.SmallestMaxSize(max_size=default_train_scales(image_size), interpolation=cv2.INTER_LINEAR),
            jitter,
            A.HorizontalFlip(p=0.5),
            A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                          fill=TRAIN_IMAGE_PAD, fill_mask=IGNORE_INDEX),
            A.RandomCrop(image_size, image_size),
        ]
    )  # fmt: skip
    ops.set_random_seed(0)
    return ops


class VocImages:
    """Decode VOC images and label PNGs straight from the layout (JPEGImages/, SegmentationClassAug/)."""

    def __init__(self, root: Path, ids: list[str]) -> None:
        self.root = root
        self.ids = ids

    def decode(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        with Image.open(self.root / "JPEGImages" / f"{image_id}.jpg") as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(self.root / "SegmentationClassAug" / f"{image_id}.png") as im:
            label = np.asarray(im)
        return image, label


class CocoImages:
    """Decode COCO images and render their semantic labels from the instance JSON (parsed here, once,
    keeping only the wanted images; class index = rank of the category id, crowd skipped)."""

    def __init__(self, root: Path, ids: list[str]) -> None:
        with open(root / "annotations" / "instances_train2014.json") as f:
            data = json.load(f)
        rank = {cid: i + 1 for i, cid in enumerate(sorted(int(c["id"]) for c in data["categories"]))}
        wanted = set(ids)
        self.images = {str(im["id"]): im for im in data["images"] if str(im["id"]) in wanted}
        self.anns: dict[str, list] = {i: [] for i in self.images}
        for a in data["annotations"]:
            key = str(a["image_id"])
            if key in self.anns and not a.get("iscrowd", 0):
                self.anns[key].append((rank[int(a["category_id"])], a["segmentation"]))
        del data
        gc.collect()
        self.image_dir = root / "train2014"
        self.ids = [i for i in ids if i in self.images]

    def decode(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        info = self.images[image_id]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = int(info["height"]), int(info["width"])
        label = np.zeros((h, w), dtype=np.uint8)
        for c, segm in self.anns[image_id]:
            if isinstance(segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = segm
            label[mask_utils.decode(rle) > 0] = c
        return image, label


def limit_rate(images, ops: A.Compose, repeats: int) -> float:
    """Median images/s of decode + ops + normalisation over ``images.ids`` (the first one is warm-up)."""
    mean, std = np.asarray(PIXEL_MEAN, np.float32), np.asarray(PIXEL_STD, np.float32)

    def one(image_id: str) -> np.ndarray:
        image, label = images.decode(image_id)
        out = ops(image=image, mask=label)
        x = (out["image"].astype(np.float32) - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1)), out["mask"]

    one(images.ids[0])
    rates = []
    for _ in range(repeats):
        with Timer() as t:
            for image_id in images.ids[1:]:
                one(image_id)
        rates.append((len(images.ids) - 1) / t.seconds)
    return median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with voc/ and coco/ (make_standin.py --out)")
    p.add_argument("--only", choices=["voc", "coco"], default=None)
    p.add_argument("--episodes", type=int, default=96, help="timed episodes per configuration")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--limit-images", type=int, default=241, help="images decoded for the limit (+1 warm-up)")
    p.add_argument("--cache-dir", default=None, help="class-count cache (default: the DataModule's)")
    args = p.parse_args()
    root = Path(args.root)
    datasets = [args.only] if args.only else ["voc", "coco"]
    print(f"# data_loader: {' '.join(sys.argv[1:])}")
    print(f"host: {host_line()}; cv2 threads {cv2.getNumThreads()}")
    for d in datasets:
        print(f"{d}: stand-in scale {standin_scale(root / d)}")
    length = (max(args.workers) + 2) * BATCH_SIZE + args.episodes * args.repeats + 64
    rows = []
    for d in datasets:
        cache = str(Path(args.cache_dir) / d) if args.cache_dir else None
        with quiet_warnings(), Timer() as t:
            make_dm(d, root, 1, 0, cache, length).pools("train", [1])  # class counts: cached once
        print(f"{NAMES[d]}: class counts ready in {t.seconds:.1f} s (not timed below)", flush=True)
        seen: list[str] = []
        loader = {}
        for shot in args.shots:
            for w in args.workers:
                with quiet_warnings():
                    dm = make_dm(d, root, shot, w, cache, length)
                    loader[shot, w] = loader_rate(dm, w, args.episodes, args.repeats, seen)
                del dm
                gc.collect()
                print(f"  {NAMES[d]} K={shot} workers={w}: {loader[shot, w]:.2f} episodes/s", flush=True)
        ids = list(dict.fromkeys(seen))[: args.limit_images + 1]
        with Timer() as t:
            images = VocImages(root / "voc", ids) if d == "voc" else CocoImages(root / "coco", ids)
        ips = limit_rate(images, limit_ops(IMAGE_SIZE), args.repeats)
        del images
        gc.collect()
        print(f"  {NAMES[d]} limit: {ips:.2f} images/s over {len(ids) - 1} images (set-up {t.seconds:.1f} s)")
        for shot in args.shots:
            lim = ips / (shot + 1)
            for w in args.workers:
                per = loader[shot, w] / max(1, w)
                rows.append(
                    (
                        NAMES[d],
                        shot,
                        w,
                        f"{loader[shot, w]:.2f}",
                        f"{per:.2f}",
                        f"{lim:.2f}",
                        f"{per / lim:.2f}",
                    )
                )
    print()
    print(
        markdown_table(
            ["dataset", "K", "workers", "loader ep/s", "per worker ep/s", "limit ep/s", "ratio"],
            rows,
            [False, True, True, True, True, True, True],
        )
    )
    print(
        f"\nimage_size {IMAGE_SIZE}, batch_size {BATCH_SIZE}, fold 0; {args.episodes} timed episodes per row "
        f"after max(1, workers) warm-up batches, median of {args.repeats}. Per worker: w = 0 counts the main "
        "process as one. Limit = decode + ops once per image in one process, images/s / (K + 1)."
    )


if __name__ == "__main__":
    main()
