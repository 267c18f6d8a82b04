"""How much the test resize changes the model's inputs: OpenCV bilinear vs the published PIL resize.

    python benchmarks/resize_diff.py [--size N] [--episodes 30]

Builds tiny ISIC-2018, Chest X-ray, Deepglobe and LVIS-92i trees (``datamodules.fake``) at image sizes
of the real sets (ISIC 1022 x 767, a common dermoscopy size; Chest X-ray 2048 x 2048, a Shenzhen X-ray;
Deepglobe 408 x 408 tiles; LVIS 640 x 480, the most common COCO 2017 size), resized to each protocol's
published size (400 for PATNet's sets, 518 for Matcher's LVIS-92i) unless ``--size`` is given, in two
contents: the fakes' uniform noise (the worst case: all detail is above the new
Nyquist limit) and a smooth image (noise blurred with a Gaussian of sigma 1 % of the image side, a
stand-in for skin or lung texture). For the test episodes' query images it prints the mean absolute
difference between the two resizes, in uint8 grey levels and in the model's normalised input units
(``(x - mean) / std`` per channel, std in grey levels), and the largest per-image mean.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from datamodules import ChestXrayDataModule, DeepglobeDataModule, ISIC2018DataModule, LVIS92iDataModule
from datamodules.fake import make_fake_chestxray, make_fake_deepglobe, make_fake_isic, make_fake_lvis
from fewshot_seg.episode import PIXEL_STD

SETS = {
    "isic2018": (ISIC2018DataModule, make_fake_isic, (767, 1022)),
    "chestxray": (ChestXrayDataModule, make_fake_chestxray, (2048, 2048)),
    "deepglobe": (DeepglobeDataModule, make_fake_deepglobe, (408, 408)),
    "lvis92i": (LVIS92iDataModule, make_fake_lvis, (480, 640)),
}


def published_size(name: str) -> int:
    """The ``image_size`` the set's default protocol was published at (PATNet 400, Matcher 518)."""
    size = SETS[name][0](root="unread").eval_protocol.published_size  # the constructor reads no file
    assert size is not None, name
    return size


def _smooth(folder: Path) -> None:
    """Blur every image of a fake tree in place (masks untouched)."""
    for path in folder.rglob("*"):
        if path.suffix in (".jpg", ".png") and "mask" not in path.name and "segmentation" not in path.name:
            if "groundtruth" in path.parts:
                continue
            image = np.asarray(Image.open(path))
            sigma = 0.01 * max(image.shape[:2])
            blurred = cv2.GaussianBlur(image, (0, 0), sigma)
            blurred = cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)
            Image.fromarray(blurred).save(path)


def measure(name: str, content: str, size: int, episodes: int, tmp: Path) -> tuple[float, float, float]:
    dm_cls, make, shape = SETS[name]
    root = make(tmp / f"{name}-{content}", size=shape)
    if content == "smooth":
        _smooth(root)
    common = {"root": str(root), "image_size": size, "num_workers": 0, "test_episodes": episodes}
    dms = {
        mode: dm_cls(cache_dir=str(tmp / f"cache-{name}-{content}-{mode}"), image_resize=mode, **common)
        for mode in ("cv2", "pil")
    }
    for dm in dms.values():
        dm.setup("test")
    source = dms["pil"].source("test")
    queries = sorted({q for q, _, _ in dms["pil"].episode_list("test")})
    levels, per_image = [], []
    for q in queries:
        image = source.load_image(q)
        blank = np.zeros(image.shape[:2], np.uint8)
        a = dms["cv2"]._test.transform(image, blank)[0].astype(np.float64)
        b = dms["pil"]._test.transform(image, blank)[0].astype(np.float64)
        diff = np.abs(a - b)
        levels.append(diff)
        per_image.append(diff.mean())
    stacked = np.stack(levels)
    normalised = (stacked / np.asarray(PIXEL_STD)).mean()  # PIXEL_STD is in grey levels
    return float(stacked.mean()), float(normalised), float(max(per_image))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=None, help="image_size; default each protocol's (PATNet 400, Matcher 518)"
    )
    parser.add_argument("--episodes", type=int, default=30, help="test episodes per set")
    args = parser.parse_args(argv)
    print(
        "| set (source size -> test size) | content | mean abs diff (grey levels) | (normalised units) "
        "| worst image |"
    )
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, shape) in SETS.items():
            size = args.size or published_size(name)
            for content in ("noise", "smooth"):
                grey, norm, worst = measure(name, content, size, args.episodes, Path(tmp))
                where = f"{name} ({shape[1]} x {shape[0]} -> {size})"
                print(f"| {where} | {content} | {grey:.2f} | {norm:.3f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
