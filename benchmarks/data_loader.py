"""Training-loader episodes/s per worker against the decode + augmentation limit, VOC and COCO.

    python benchmarks/data_loader.py --root /work/data/standin [--only voc|coco] [--episodes 96]
        [--repeats 1] [--workers 0 1 2] [--shots 1 5] [--cache-dir DIR]

``--root`` holds ``voc/`` (Pascal5iDataModule) and ``coco/`` (Coco20iDataModule, year 2014), e.g. the
stand-in of ``benchmarks/make_standin.py`` at any ``--scale``. Every figure comes from this one run.

Loader: ``dm.train_dataloader()`` at image_size 480, batch_size 4, fold 0, K = ``--shots`` (with
``--stage1``, the stage-1 loader: the query alone, whatever K),
``num_workers`` = ``--workers``. The first max(1, w) batches (one per worker: start-up) are not timed;
then ``--episodes`` episodes are timed. Per worker = episodes/s divided by w (w = 0: the main process
counts as one worker). Class pools come from the class-count cache in ``--cache-dir`` (default: the
DataModule's, ``<root>/<dataset>/fewshot_cache``), built once if missing and not timed
(``train_dataloader()`` also draws the val episode list: ``setup("fit")``).

Limit: in this one process, decode (JPEG with PIL; VOC label PNG with PIL, COCO label rendered from the
instance JSON with pycocotools) and the training pipeline's ops applied once per image (shortest-edge
resize to a random scale of ``default_train_scales(480)``, a 480 crop with padding, TrainAugment's
colour jitter and h-flip, in the order TrainAugment applies them, uint8 HWC to CHW, as the loader ships
images; the model normalises them on its device); no
sampling logic (no crop re-draws, no support re-augmentation, no episode assembly, no worker
transfer). Written here, not imported, so it does not share the code paths being measured. Its
images: a fixed random sample (``--limit-images``) of the images the loader draws from (the union of
the fold's base-class pools). Limit episodes/s for K shots = images/s / (K + 1) (stage 1: / 1); ratio =
loader per worker / limit.

Side by side: every repeat times a loader window, shuts its workers down, then times a limit window
of ``--limit-window`` images right after it, so each ratio compares two figures taken under the same
load of a shared machine; a row gives the medians over ``--repeats``. Rates are also given per
CPU-second of the main process and its workers (all threads, ``/proc/<pid>/stat``).

On a busy 2-core machine, torch's default 2 intra-op threads make ``num_workers=0`` (episodes built and
collated in the main process) several times slower (threads waiting on each other while the other core
is taken); ``--torch-threads 1`` removes that effect from the comparison (workers always use 1 thread).
OpenCV's resize and colour conversion run on all cores by default, so the one-process limit uses more
than one core where cores are free; ``--cv2-threads 1`` compares one core with one worker.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import cv2
import numpy as np
import torch
from _measure import (
    Timer,
    child_pids,
    cmdline,
    cpu_seconds,
    host_line,
    markdown_table,
    median,
    quiet_warnings,
    standin_scale,
)
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import Coco20iDataModule, Pascal5iDataModule, TrainAugment, default_train_scales
from datamodules.transforms import TRAIN_IMAGE_PAD
from fewshot_seg.episode import IGNORE_INDEX

IMAGE_SIZE = 480
BATCH_SIZE = 4
NAMES = {"voc": "VOC (Pascal5i)", "coco": "COCO 2014 (Coco20i)"}


STAGE1_TRAINER = SimpleNamespace(
    lightning_module=SimpleNamespace(trains_with_supports=False),  # what POSModule says (contracts)
    world_size=1,
    global_rank=0,
    global_step=0,
    accumulate_grad_batches=1,
)
"""The Trainer a stage-1 loader sees: its model trains on the query alone, so episodes carry no support."""


def make_dm(
    dataset: str,
    root: Path,
    shot: int,
    workers: int,
    cache_dir: str | None,
    length: int,
    stage1: bool = False,
):
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
        dm = Pascal5iDataModule(root=str(root / "voc"), **kw)
    else:
        dm = Coco20iDataModule(root=str(root / "coco"), year=2014, **kw)
    if stage1:
        dm.trainer = STAGE1_TRAINER
    return dm


def loader_cpu() -> float:
    """CPU seconds so far of this process and its children (the loader's workers)."""
    return cpu_seconds() + sum(cpu_seconds(p) for p in worker_pids())


def worker_pids() -> list[int]:
    return [p for p in child_pids() if "resource_tracker" not in cmdline(p)]


def loader_window(dm, workers: int, episodes: int) -> tuple[float, float]:
    """Episodes/s and episodes per CPU-second (main + workers) of a fresh training loader of ``dm``;
    its workers are shut down before returning."""
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)  # start-up: the first batch of each worker
    n = 0
    cpu0 = loader_cpu()
    with Timer() as t:
        while n < episodes:
            n += next(it).batch_size
    cpu = loader_cpu() - cpu0
    del it, loader  # persistent workers end with their loader
    gc.collect()
    for _ in range(100):
        if not worker_pids():
            break
        time.sleep(0.05)
    return n / t.seconds, n / max(cpu, 1e-9)


# ---- the limit ---------------------------------------------------------------------------------------
def limit_ops(image_size: int) -> A.Compose:
    """The training pipeline's ops, applied once, in the order the measured TrainAugment applies them.

    A TrainAugment with a ``photometric`` pipeline (jitter and flip on the crop) gives resize -> crop ->
    jitter -> flip; one with a single ``pipeline`` (the older code: jitter and flip on the whole resized
    image) gives resize -> jitter -> flip -> crop. The jitter is copied from TrainAugment (else SPEC's
    values); the shortest-edge scales are ``default_train_scales``.
    """
    augment = TrainAugment(image_size)
    on_crop = hasattr(augment, "photometric")
    source = augment.photometric if on_crop else getattr(augment, "pipeline", None)
    jitter = next(
        (copy.deepcopy(t) for t in getattr(source, "transforms", []) if isinstance(t, A.ColorJitter)), None
    )
    if jitter is None:
        jitter = A.ColorJitter(brightness=0.2, contrast=0.3, saturation=0.3, hue=0.03, p=0.8)
    resize = A.SmallestMaxSize(max_size=default_train_scales(image_size), interpolation=cv2.INTER_LINEAR)
    crop = [
        A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=TRAIN_IMAGE_PAD, fill_mask=IGNORE_INDEX),
        A.RandomCrop(image_size, image_size),
    ]  # fmt: skip
    photometric = [jitter, A.HorizontalFlip(p=0.5)]
    ops = A.Compose([resize, *crop, *photometric] if on_crop else [resize, *photometric, *crop])
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
        label = np.zeros((h, w), dtype=np.uint8, order="F")  # the order pycocotools decodes in: faster
        for c, segm in self.anns[image_id]:
            if isinstance(segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = segm
            label[mask_utils.decode(rle) > 0] = c
        return image, np.ascontiguousarray(label)


class Limit:
    """Decode + ops + channels-first uint8 of the sample, in windows of consecutive images (cycling)."""

    def __init__(self, images, ops: A.Compose) -> None:
        self.images, self.ops, self.cursor = images, ops, 0

    def one(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images.decode(image_id)
        out = self.ops(image=image, mask=label)
        return np.ascontiguousarray(out["image"].transpose(2, 0, 1)), out["mask"]

    def window(self, n: int) -> tuple[float, float]:
        """Images/s and images per CPU-second over the next ``n`` images of the sample."""
        ids = self.images.ids
        todo = [ids[(self.cursor + k) % len(ids)] for k in range(n)]
        self.cursor = (self.cursor + n) % len(ids)
        cpu0 = cpu_seconds()
        with Timer() as t:
            for image_id in todo:
                self.one(image_id)
        return n / t.seconds, n / max(cpu_seconds() - cpu0, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with voc/ and coco/ (make_standin.py --out)")
    p.add_argument("--only", choices=["voc", "coco"], default=None)
    p.add_argument("--episodes", type=int, default=96, help="timed episodes per configuration")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument(
        "--stage1", action="store_true", help="stage-1 loaders: the query only (K images fewer per episode)"
    )
    p.add_argument("--limit-images", type=int, default=240, help="size of the limit's image sample")
    p.add_argument("--limit-window", type=int, default=96, help="images per limit window (one per repeat)")
    p.add_argument("--cache-dir", default=None, help="class-count cache (default: the DataModule's)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (default: torch's; workers always use 1)",
    )
    p.add_argument(
        "--cv2-threads",
        type=int,
        default=None,
        help="OpenCV threads of the main process (the limit) and, inherited, the workers (default: OpenCV's)",
    )
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.cv2_threads is not None:
        cv2.setNumThreads(args.cv2_threads)
    root = Path(args.root)
    datasets = [args.only] if args.only else ["voc", "coco"]
    print(f"# data_loader: {' '.join(sys.argv[1:])}")
    print(
        f"host: {host_line()}; main process: torch threads {torch.get_num_threads()}, "
        f"cv2 threads {cv2.getNumThreads()}"
    )
    for d in datasets:
        print(f"{d}: stand-in scale {standin_scale(root / d)}")
    length = (max(args.workers) + 2) * BATCH_SIZE + args.episodes + 64
    rows = []
    for d in datasets:
        cache = str(Path(args.cache_dir) / d) if args.cache_dir else None
        with quiet_warnings(), Timer() as t:
            pre = make_dm(d, root, 1, 0, cache, length)
            pre.train_dataloader()  # train class counts and (setup("fit")) the val episode list
            pools = pre.pools("train", pre.base_classes)
        population = sorted({i for ids in pools.values() for i in ids})
        del pre, pools
        gc.collect()
        print(f"{NAMES[d]}: class counts and val list ready in {t.seconds:.1f} s (not timed)", flush=True)
        rng = np.random.default_rng(0)
        sample = [population[int(k)] for k in rng.permutation(len(population))[: args.limit_images]]
        with Timer() as t:
            images = VocImages(root / "voc", sample) if d == "voc" else CocoImages(root / "coco", sample)
        limit = Limit(images, limit_ops(IMAGE_SIZE))
        limit.one(sample[0])  # warm-up
        print(f"  limit sample: {len(sample)} of {len(population):,} pool images (set-up {t.seconds:.1f} s)")
        for shot in args.shots:
            for w in args.workers:
                runs = []
                with quiet_warnings():
                    dm = make_dm(d, root, shot, w, cache, length, args.stage1)
                    for _ in range(args.repeats):
                        runs.append((*loader_window(dm, w, args.episodes), *limit.window(args.limit_window)))
                del dm
                gc.collect()
                rate, cpu_rate, ips, cpu_ips = (median([r[k] for r in runs]) for k in range(4))
                per = rate / max(1, w)
                read = 1 if args.stage1 else shot + 1  # images an episode reads
                ratio = median([r[0] / max(1, w) / (r[2] / read) for r in runs])
                cpu_ratio = median([r[1] / (r[3] / read) for r in runs])
                lim, cpu_lim = ips / read, cpu_ips / read
                rows.append(
                    (NAMES[d], shot, w, f"{rate:.2f}", f"{per:.2f}", f"{lim:.2f}", f"{ratio:.2f}",
                     f"{cpu_rate:.2f}", f"{cpu_lim:.2f}", f"{cpu_ratio:.2f}")
                )  # fmt: skip
                print(
                    f"  {NAMES[d]} K={shot} workers={w}: {rate:.2f} episodes/s ({cpu_rate:.2f} per CPU-s); "
                    f"limit {ips:.1f} images/s ({cpu_ips:.1f} per CPU-s)",
                    flush=True,
                )
        del limit, images
        gc.collect()
    print()
    print(
        markdown_table(
            [
                "dataset",
                "K",
                "workers",
                "loader ep/s",
                "per worker ep/s",
                "limit ep/s",
                "ratio",
                "loader ep/CPU-s",
                "limit ep/CPU-s",
                "CPU ratio",
            ],
            rows,
            [False] + [True] * 9,
        )
    )
    print(
        f"\nimage_size {IMAGE_SIZE}, batch_size {BATCH_SIZE}, fold 0; {args.episodes} timed episodes per row "
        f"after max(1, workers) warm-up batches, each followed by a limit window of {args.limit_window} "
        "images; "
        f"medians of {args.repeats}. Per worker: w = 0 counts the main process as one. Limit = decode + ops "
        "once per image in one process, images/s / (K + 1) (stage-1 loaders: / 1). ep/CPU-s: episodes per "
        "CPU-second of the main process and its workers (all threads, /proc/<pid>/stat); CPU ratio = "
        "loader / limit."
    )


if __name__ == "__main__":
    main()
