"""Pascal-5i: VOC2012 images + SBD-augmented labels (SPEC §5)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import EpisodeDataModule
from .cache import fingerprint_files
from .errors import DatasetError
from .source import SegmentationSource, read_label_png, read_rgb

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = """expected layout under the root:
  JPEGImages/<id>.jpg                 VOC2012 images
  SegmentationClassAug/<id>.png       SBD-augmented labels (palette or grey PNG: 0 bg, 1..20, 255 boundary)
  ImageSets/Segmentation/val.txt      VOC2012 val ids (the test images)"""


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}\n{VOC_LAYOUT}")


class VOCSource(SegmentationSource):
    """One split of a VOC-format dataset: "test" = ids in val.txt, "train" = the other label PNGs."""

    num_classes = 20

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        root = Path(root)
        _require(root, "dataset root")
        self.image_dir = root / "JPEGImages"
        self.label_dir = root / "SegmentationClassAug"
        val_file = root / "ImageSets" / "Segmentation" / "val.txt"
        _require(self.image_dir, "image folder")
        _require(self.label_dir, "label folder")
        _require(val_file, "val list")
        val_ids = [line.split()[0] for line in val_file.read_text().splitlines() if line.strip()]
        label_ids = {p[:-4] for p in os.listdir(self.label_dir) if p.endswith(".png")}
        image_ids = {p[:-4] for p in os.listdir(self.image_dir) if p.endswith(".jpg")}
        if split == "test":
            ids = sorted(set(val_ids))
            no_label = [i for i in ids if i not in label_ids]
            if no_label:
                raise DatasetError(
                    f"{len(no_label)} images of {val_file} have no label in {self.label_dir}, "
                    f"e.g. {self.image_dir / (no_label[0] + '.jpg')} has no {no_label[0]}.png"
                )
        elif split == "train":
            ids = sorted(label_ids - set(val_ids))
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        no_image = [i for i in ids if i not in image_ids]
        if no_image:
            raise DatasetError(
                f"{len(no_image)} labels have no image in {self.image_dir}, "
                f"e.g. {self.label_dir / (no_image[0] + '.png')} has no {no_image[0]}.jpg"
            )
        if not ids:
            raise DatasetError(f"no {split} images found under {root}\n{VOC_LAYOUT}")
        self.ids = ids

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_dir / f"{image_id}.jpg")

    def load_label(self, image_id: str) -> np.ndarray:
        return read_label_png(self.label_dir / f"{image_id}.png", self.num_classes)

    def fingerprint(self) -> str:
        return fingerprint_files((self.label_dir / f"{i}.png" for i in self.ids), extra=len(self.ids))


class Pascal5iDataModule(EpisodeDataModule):
    """Pascal-5i episodes: 20 VOC classes, fold i novel = 5i+1..5i+5 (SPEC §5).

    Training images are the ``SegmentationClassAug`` labels not listed in
    ``ImageSets/Segmentation/val.txt``; test and validation episodes come from the val images.
    Class pools (>= ``pool_min_pixels`` of the class) are computed from the labels at first use and
    cached in ``cache_dir``; episode lists are written to ``episode_list_dir`` and reused. Every other
    argument is :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: VOC2012 folder holding ``JPEGImages/``, ``SegmentationClassAug/`` and
            ``ImageSets/Segmentation/val.txt``.
    """

    name = "pascal5i"
    num_classes = 20
    class_names = PASCAL_CLASSES

    def __init__(self, root: str = "data/VOCdevkit/VOC2012", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def fold_novel_classes(self, fold: int) -> list[int]:
        return list(range(5 * fold + 1, 5 * fold + 6))

    def make_source(self, split: str) -> SegmentationSource:
        return VOCSource(self.root, split)
