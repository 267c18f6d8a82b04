"""LVIS-92i: LVIS v1 instance annotations on COCO 2017 images, 10 folds of the val categories.

Matcher (aim-uofa/Matcher ``matcher/data/lvis.py``) reads pickles its authors built from LVIS; this
reads the raw ``lvis_v1_{train,val}.json`` with the COCO-style reader of :mod:`datamodules.coco`.
Labels are image-local: the categories of an image get values 1..n (:meth:`LVISSource.label_classes`),
since 1,203 categories do not fit a uint8 label.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .base import EpisodeDataModule
from .cache import fingerprint_files
from .coco import annotation_rle, group_annotations, read_instances_json
from .errors import DatasetError
from .protocols import ProtocolName
from .source import SegmentationSource, build_pools, read_rgb

LVIS_LAYOUT = """expected layout:
  <root>/annotations/lvis_v1_train.json, <root>/annotations/lvis_v1_val.json   LVIS v1 annotations
  <image_root>/train2017/<file>, <image_root>/val2017/<file>   COCO 2017 images (image_root = root by
      default); an image's folder and file are the last two parts of its coco_url"""

NUM_FOLDS = 10
MAX_IMAGE_CATEGORIES = 254


def image_path(im: dict, ann_file: Path) -> str:
    """``<train2017|val2017>/<file>`` of an LVIS image: the last two parts of its ``coco_url`` (as the LVIS
    API and detectron2 derive it), else its ``file_name``."""
    url = im.get("coco_url")
    if url:
        return "/".join(str(url).rstrip("/").split("/")[-2:])
    if im.get("file_name"):
        return str(im["file_name"])
    raise DatasetError(f"{ann_file}: image {im.get('id')} has neither coco_url nor file_name")


class LVISSource(SegmentationSource):
    """One LVIS split. The label of an image paints the union of each of its categories' instances with
    the category's image-local value, larger categories first (where categories overlap the smaller is
    on top); :meth:`load_class_label` paints the episode class last, so its mask is the whole union of
    its instances, as Matcher's is."""

    num_classes = MAX_IMAGE_CATEGORIES

    def __init__(self, ann_file: str | os.PathLike, image_root: str | os.PathLike) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        if not self.ann_file.is_file():
            raise DatasetError(f"annotation file not found: {self.ann_file}\n{LVIS_LAYOUT}")
        data = read_instances_json(self.ann_file, "LVIS")
        self.categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        by_image = group_annotations(self.ann_file, data)
        self.images: dict[str, tuple[str, int, int]] = {
            str(im["id"]): (image_path(im, self.ann_file), int(im["height"]), int(im["width"]))
            for im in data["images"]
        }
        # image -> category -> segmentations of its instances, categories sorted (value = rank + 1)
        self.anns: dict[str, dict[int, list]] = {}
        for key, anns in by_image.items():
            per_cat: dict[int, list] = {}
            for a in anns:
                per_cat.setdefault(int(a["category_id"]), []).append(a["segmentation"])
            if len(per_cat) > MAX_IMAGE_CATEGORIES:
                raise DatasetError(
                    f"{self.ann_file}: image {key} has {len(per_cat)} categories, more than a uint8 label "
                    "holds"
                )
            self.anns[key] = dict(sorted(per_cat.items()))
        self.ids = sorted(self.images, key=lambda i: (len(i), i))
        if not self.ids:
            raise DatasetError(f"{self.ann_file} lists no images")

    # ---- categories -------------------------------------------------------------------------------
    def category_images(self) -> dict[int, int]:
        """category id -> number of images with an instance of it."""
        n = dict.fromkeys(self.categories, 0)
        for per_cat in self.anns.values():
            for c in per_cat:
                n[c] += 1
        return n

    # ---- labels ------------------------------------------------------------------------------------
    def label_classes(self, image_id: str) -> dict[int, int]:
        return {v + 1: c for v, c in enumerate(self.anns[image_id])}

    def _rles(self, image_id: str) -> dict[int, dict]:
        _, h, w = self.images[image_id]
        return {
            c: mask_utils.merge([annotation_rle(s, h, w) for s in segs], intersect=False)
            for c, segs in self.anns[image_id].items()
        }

    def image_class_counts(self, image_id: str) -> dict[int, int]:
        """Pixels of each category's instance union (from the RLEs, nothing is rendered); every annotated
        category is listed, also when its polygons cover no pixel."""
        return {c: int(mask_utils.area(rle)) for c, rle in self._rles(image_id).items()}

    def _render(self, image_id: str, on_top: int | None) -> np.ndarray:
        _, h, w = self.images[image_id]
        rles = self._rles(image_id)
        value = {c: v + 1 for v, c in enumerate(rles)}
        order = sorted(rles, key=lambda c: (c == on_top, -int(mask_utils.area(rles[c])), c))
        label = np.zeros((h, w), dtype=np.uint8)
        for c in order:
            label[mask_utils.decode(rles[c]) > 0] = value[c]
        return label

    def load_label(self, image_id: str) -> np.ndarray:
        return self._render(image_id, None)

    def load_class_label(self, image_id: str, class_id: int) -> np.ndarray:
        return self._render(image_id, class_id)

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_root / self.images[image_id][0])

    def fingerprint(self) -> str:
        return fingerprint_files([self.ann_file])


class LVIS92iDataModule(EpisodeDataModule):
    """LVIS-92i episodes (Matcher's benchmark): 10 folds of the LVIS v1 val categories.

    Eligible classes are the val categories with instances in more than one val image, in category-id
    order; fold i holds eligible classes i, i+10, i+20, ... (``len(eligible) // 10`` of them, 92 on LVIS
    v1). With ``fold_classes_from_shot`` a category needs more than ``shot`` val images instead
    (Matcher's rule: its K-shot folds are drawn from fewer classes, interleaved anew). Test and
    validation episodes come from the val images (``protocol="lvis92i"``: 2,300 episodes, 25 per class
    in turn; query and supports uniform over the class's images, supports never the query; images
    resized with PIL's antialiased bilinear filter, labels nearest; scored at 518 x 518). The mask of an
    episode is the union of all instances of its class. Training episodes come from the train images,
    over the categories of no fold-i class. Every other argument is
    :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: Folder holding ``annotations/lvis_v1_{train,val}.json``.
        image_root: Folder holding the COCO 2017 ``train2017/`` and ``val2017/`` images; default ``root``.
        image_size: Side of the square model input; Matcher tests at 518.
        protocol: Evaluation protocol; "lvis92i" is Matcher's.
        test_episodes: Test episodes (Matcher: 2,300 per fold).
        test_seed: Seed of the test episode list.
        pool_min_pixels: Pixels a class needs in a val image for the image to be drawn for it; 0 keeps
            every image with an instance of the class (Matcher).
        train_pool_min_pixels: The same for training images (PFENet's 2,048 by default); training
            classes with fewer than shot + 1 such images are left out.
        fold_classes_from_shot: Matcher's shot-dependent folds: only categories in more than ``shot``
            val images are eligible, so at 2..5 shots the folds hold other classes than at 1 shot (and
            a model trained for the 1-shot fold has seen some of them). False (default): the 1-shot
            folds at every shot.
    """

    name = "lvis92i"
    num_folds = NUM_FOLDS

    def __init__(
        self,
        root: str = "data/lvis",
        image_root: str | None = None,
        image_size: int = 518,
        protocol: ProtocolName = "lvis92i",
        test_episodes: int = 2300,
        test_seed: int = 0,
        pool_min_pixels: int = 0,
        train_pool_min_pixels: int = 2048,
        fold_classes_from_shot: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            protocol=protocol,
            test_episodes=test_episodes,
            test_seed=test_seed,
            pool_min_pixels=pool_min_pixels,
            **kwargs,
        )
        self.image_root = Path(image_root) if image_root else self.root
        self.train_pool_min_pixels = train_pool_min_pixels
        self.fold_classes_from_shot = fold_classes_from_shot

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"lvis_v1_{'train' if split == 'train' else 'val'}.json"

    def make_source(self, split: str) -> SegmentationSource:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return LVISSource(self.annotation_file(split), self.image_root)

    # ---- classes -----------------------------------------------------------------------------------
    @property
    def _val_source(self) -> LVISSource:
        return self.source("test")  # type: ignore[return-value]

    @property
    def fold_min_images(self) -> int:
        """Val images a category needs to be eligible for a fold: 2 (a query and another support), or
        ``shot + 1`` with ``fold_classes_from_shot`` (Matcher's ``len(val_anno[c]) > shot``)."""
        return self.shot + 1 if self.fold_classes_from_shot else 2

    @cached_property
    def eligible_classes(self) -> list[int]:
        """Val categories with instances in at least :attr:`fold_min_images` val images, by id."""
        need = self.fold_min_images
        return [c for c, n in sorted(self._val_source.category_images().items()) if n >= need]

    def fold_novel_classes(self, fold: int) -> list[int]:
        eligible = self.eligible_classes
        per_fold = len(eligible) // NUM_FOLDS
        if per_fold == 0:
            raise DatasetError(
                f"{self.annotation_file('test')}: {len(eligible)} categories have instances in at least "
                f"{self.fold_min_images} images; {NUM_FOLDS} folds need at least {NUM_FOLDS}"
            )
        return [eligible[fold + NUM_FOLDS * v] for v in range(per_fold)]

    @property
    def list_name(self) -> str:
        # Matcher's K-shot folds hold other classes than the 1-shot ones: their own list files.
        need = self.fold_min_images
        return self.name if need == 2 else f"{self.name}_min{need}images"

    def provenance(self) -> dict[str, Any]:
        record = super().provenance()
        if self.fold_classes_from_shot:  # recorded only when on: older records are the default's
            record["fold_classes_from_shot"] = True
        return record

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return max(self._val_source.categories)

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        cats = self._val_source.categories
        return tuple(cats.get(c, str(c)) for c in range(1, self.num_classes + 1))

    @property
    def base_classes(self) -> list[int]:
        novel = set(self.novel_classes)
        return [c for c in sorted(self._val_source.categories) if c not in novel]

    def train_pools(self) -> dict[int, list[str]]:
        """Base-class pools of the train images at ``train_pool_min_pixels``, without the classes that
        have fewer images than a query plus the training episode's supports (``training_shot``)."""
        need = self.training_shot() + 1
        pools = build_pools(self.class_counts("train"), self.base_classes, self.train_pool_min_pixels)
        pools = {c: ids for c, ids in pools.items() if len(ids) >= need}
        if not pools:
            raise DatasetError(
                f"{self.annotation_file('train')}: no training category has {need} images with "
                f"{self.train_pool_min_pixels} pixels of it"
            )
        return pools
