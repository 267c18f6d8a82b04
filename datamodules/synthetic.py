"""A procedural few-shot dataset written in the VOC on-disk format and read as Pascal-5i.

20 classes = 5 shapes x 4 colour/texture families. Class ``5i + j + 1`` (fold ``i``, slot ``j``)
has shape ``j`` and family ``(i + j) % 4``, so every (shape, family) pair is used exactly once
and each fold's 5 novel classes have all 5 shapes: a novel class always shares its shape with 3
base classes and its family with 3-4 other base classes, so only its support tells it apart.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewshot_seg.label_maps import voc_palette

from .cache import read_json, swap_in_dir
from .pascal import Pascal5iDataModule
from .source import SegmentationSource

GENERATOR_VERSION = 1
SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring")
FAMILIES = ("red stripes", "green checks", "blue dots", "yellow speckles")
_FAMILY_RGB = np.array([[205, 45, 40], [45, 165, 60], [45, 75, 205], [225, 200, 45]], dtype=np.float32)


def class_attributes(class_id: int) -> tuple[int, int]:
    """(shape index, family index) of a 1-based synthetic class id."""
    fold, slot = divmod(class_id - 1, 5)
    return slot, (fold + slot) % 4


SYNTHETIC_CLASSES = tuple(f"{FAMILIES[f]} {SHAPES[s]}" for s, f in map(class_attributes, range(1, 21)))


BOUNDARY_WIDTH = 3
"""Width in pixels of the 255 band the synthetic labels have where labels meet."""


def add_boundary(label: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """A copy of ``label`` with a VOC-style 255 band ``width`` px wide where label values meet.

    The band is the two pixels on either side of every edge (object/background and object/object),
    grown by ``width - 2`` pixels towards +y and +x.
    """
    if width < 2:
        raise ValueError(f"width must be at least 2, got {width}")
    dy, dx = label[1:] != label[:-1], label[:, 1:] != label[:, :-1]
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    for _ in range(width - 2):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    out = label.copy()
    out[edge] = 255
    return out


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside-test of a unit-size shape in rotated, normalised coordinates ``u, v``."""
    if shape == 0:
        return (u / aspect) ** 2 + v**2 <= 1.0
    if shape == 1:
        return (np.abs(u) <= aspect * 0.85) & (np.abs(v) <= 0.85)
    if shape == 2:
        inside = np.ones(u.shape, dtype=bool)
        for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(ang) + v * np.sin(ang) <= 0.65  # ~ the area of the other shapes
        return inside
    if shape == 3:
        arm = 0.36
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1)) | ((np.abs(u) <= 1) & (np.abs(v) <= arm))
    r = np.sqrt(u**2 + v**2)
    return (r <= 1.0) & (r >= 0.55)


def _texture(family: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` float texture of a colour family (two tones of its colour in its pattern)."""
    base = _FAMILY_RGB[family] * rng.uniform(0.85, 1.1)
    period = rng.uniform(5, 9)
    if family == 0:
        phi = rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period) > 0
    elif family == 1:
        pattern = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    elif family == 2:
        px, py = (xx + rng.uniform(0, period)) % period, (yy + rng.uniform(0, period)) % period
        pattern = (px - period / 2) ** 2 + (py - period / 2) ** 2 > (period / 3.2) ** 2
    else:
        pattern = rng.random(xx.shape) > 0.35
    tone = np.where(pattern, 1.0, 0.55)[..., None]
    return base[None, None, :] * tone


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation gradient + blotches + grey lines + noise: textured but colour-neutral."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grey = rng.uniform(60, 200)
    tint = rng.uniform(-18, 18, size=3)
    gx, gy = rng.uniform(-0.4, 0.4, size=2)
    img = grey + tint[None, None, :] + (gx * (xx - w / 2) + gy * (yy - h / 2))[..., None]
    for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 40)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += (rng.uniform(-45, 45) * blob)[..., None]
    for _ in range(int(rng.integers(0, 4))):
        phi, off = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * max(h, w)
        d = np.abs((xx - w / 2) * np.cos(phi) + (yy - h / 2) * np.sin(phi) - off)
        img[d < rng.uniform(1, 3)] = rng.uniform(30, 230)
    return img


def render_image(
    h: int,
    w: int,
    rng: np.random.Generator,
    max_objects: int = 3,
    size_range: tuple[float, float] = (0.2, 0.45),
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image ``[H, W, 3]`` uint8 and its label ``[H, W]`` uint8 (0, 1..20, 255 boundary)."""
    img = _background(h, w, rng)
    label = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        c = int(rng.integers(1, 21))
        shape, family = class_attributes(c)
        r = rng.uniform(*size_range) * side / 2  # half of the object's extent
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
        theta = rng.uniform(0, 2 * np.pi)
        dy, dx = (yy - cy) / r, (xx - cx) / r
        u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
        mask = _shape_mask(shape, u, v, rng.uniform(0.65, 1.0))
        img[mask] = _texture(family, yy, xx, rng)[mask]
        label[mask] = c  # later objects overwrite earlier ones, as in COCO rendering
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), add_boundary(label, BOUNDARY_WIDTH)


def generator_params(num_train: int, num_val: int, seed: int, min_side: int, max_side: int) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "min_side": min_side,
        "max_side": max_side,
    }


def generate_synthetic_voc(
    root: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 500,
    seed: int = 0,
    min_side: int = 112,
    max_side: int = 176,
    force: bool = False,
) -> bool:
    """Write the synthetic dataset under ``root`` in VOC format unless it is already there.

    Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (VOC palette),
    ``ImageSets/Segmentation/val.txt``, ``manifest.json`` (the parameters). Image ``k`` of a split
    depends only on ``(seed, split, k)``. The set is built in a sibling temporary folder and
    swapped in with renames, so an interrupted run never leaves a half-written dataset.
    Returns True if it (re)generated.
    """
    root = Path(root)
    params = generator_params(num_train, num_val, seed, min_side, max_side)
    if not force and read_json(root / "manifest.json") == params:
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{time.time_ns()}"
    (tmp / "JPEGImages").mkdir(parents=True)
    (tmp / "SegmentationClassAug").mkdir()
    (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = voc_palette()
    try:
        val_ids = []
        for split, count, code in (("train", num_train, 0), ("val", num_val, 1)):
            for k in range(count):
                rng = np.random.default_rng([seed, code, k])
                h, w = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
                image, label = render_image(h, w, rng)
                image_id = f"{split}_{k:05d}"
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{image_id}.jpg", quality=92)
                png = Image.fromarray(label, mode="P")
                png.putpalette(palette)
                png.save(tmp / "SegmentationClassAug" / f"{image_id}.png")
                if split == "val":
                    val_ids.append(image_id)
        (tmp / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val_ids) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(params))
        swap_in_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


class SyntheticDataModule(Pascal5iDataModule):
    """Pascal-5i episodes on a generated dataset (CPU demos and tests); see the module docstring.

    The data is generated under ``root`` on first use (``prepare_data`` or ``setup``) and
    regenerated only when missing or when the generator arguments change; it is then read
    through the Pascal-5i code path. Sizes default small so a CPU can train on it; the other
    arguments are :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: Folder the VOC-format synthetic dataset is written to and read from.
        image_size: Side of the square model input.
        num_workers: DataLoader worker processes (episodes do not depend on it).
        val_episodes: Episodes of the validation list (val images, other seed).
        pool_min_pixels: Class pixels an image needs to enter a class pool. The generated images
            are ~0.1x the area of VOC's, so the default is about 2,048 scaled down accordingly.
        num_train: Generated training images.
        num_val: Generated val (test) images.
        generator_seed: Seed of the generated images.
        min_side: Smallest generated image side (sides are drawn uniformly in [min_side, max_side]).
        max_side: Largest generated image side.
    """

    name = "synthetic"
    class_names = SYNTHETIC_CLASSES

    def __init__(
        self,
        root: str = "data/synthetic",
        image_size: int = 128,
        num_workers: int = 2,
        val_episodes: int = 200,
        pool_min_pixels: int = 200,
        num_train: int = 2000,
        num_val: int = 500,
        generator_seed: int = 0,
        min_side: int = 112,
        max_side: int = 176,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            num_workers=num_workers,
            val_episodes=val_episodes,
            pool_min_pixels=pool_min_pixels,
            **kwargs,
        )
        self.generator_args = {
            "num_train": num_train,
            "num_val": num_val,
            "seed": generator_seed,
            "min_side": min_side,
            "max_side": max_side,
        }

    def prepare_data(self) -> None:
        generate_synthetic_voc(self.root, **self.generator_args)

    def make_source(self, split: str) -> SegmentationSource:
        self.prepare_data()  # cheap when present; covers use without a Trainer
        return super().make_source(split)
