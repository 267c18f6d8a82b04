"""A user's COCO instance JSON (CVAT, Label Studio, Roboflow, ... exports) as few-shot episodes.

The JSON is read by the COCO-20i code (:class:`~datamodules.coco.COCOSource`: polygons, RLE and
uncompressed RLE rendered to a semantic label, later instances over earlier ones, crowd regions skipped or
255), with any category ids: label ``i + 1`` is the ``i``-th category by id, and the names are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from .cache import fingerprint_files
from .coco import COCOSource
from .errors import DatasetError
from .own_classes import (
    MAX_CLASSES,
    ClassList,
    MissingImages,
    OwnClassesDataModule,
    drop_missing,
    split_by_novel,
)
from .source import SegmentationSource

COCO_FORMAT_LAYOUT = """expected: a COCO instance JSON ("images", "annotations", "categories") and the
  folder its images' file_name entries are relative to, e.g. a CVAT export:
  annotations/instances_default.json + images/"""


class CocoFileSource(COCOSource):
    """The images ``ids`` (all by default) of one COCO-format JSON, whose image files are under ``image_dir``.

    Any number of categories (up to 254) with any integer ids; images listed but missing on disk are
    refused or left out (``missing_images``).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        crowd: str = "skip",
        cache_dir: str | os.PathLike | None = None,
        ids: list[str] | None = None,
        missing_images: MissingImages = "error",
    ) -> None:
        self.ann_file, self.image_dir, self.crowd = Path(ann_file), Path(image_dir), crowd
        if not self.ann_file.is_file():
            raise DatasetError(f"annotation file not found: {self.ann_file}\n{COCO_FORMAT_LAYOUT}")
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}\n{COCO_FORMAT_LAYOUT}")
        key = hashlib.sha1(str(self.ann_file.resolve()).encode()).hexdigest()[:8]
        prefix = Path(cache_dir) / f"coco_format_index_{self.ann_file.stem}_{key}" if cache_dir else None
        self._index(prefix)
        ids = self.ids if ids is None else ids
        missing = [(i, str(self.image_dir / self.record(i)[0])) for i in ids]
        missing = [(i, f) for i, f in missing if not os.path.isfile(f)]
        self.ids = drop_missing(ids, missing, missing_images, str(self.ann_file))
        if not self.ids:
            raise DatasetError(f"{self.ann_file}: no image to read")

    def _check_categories(self, cat_ids: list[int]) -> None:
        if not cat_ids:
            raise DatasetError(f"{self.ann_file}: 'categories' is empty")
        if len(cat_ids) > MAX_CLASSES:
            raise DatasetError(
                f"{self.ann_file}: {len(cat_ids)} categories, more than the {MAX_CLASSES} a uint8 label holds"
            )

    def image_classes(self) -> dict[str, set[int]]:
        """image id -> the labels of its annotations (crowd regions too), from the JSON alone."""
        return {i: {c for c, _, _ in self.record(i)[3]} for i in self.ids}

    def fingerprint(self) -> str:
        return fingerprint_files(
            [self.ann_file], extra=[self.crowd, hashlib.sha1(json.dumps(self.ids).encode()).hexdigest()]
        )


class CocoFormatDataModule(OwnClassesDataModule):
    """Few-shot episodes on your own COCO-format instance annotations, with your own class split.

    Which images each split reads:

    * one JSON (no ``test_annotations``): the images holding an annotation of a novel class are the test
      (and validation) images, all others the training images, so a training episode never shows a novel
      object and no test image is trained on;
    * two JSONs: training images are those of ``annotations`` (novel objects in them are ignored, 255, as
      in COCO-20i), test and validation images those of ``test_annotations``; both must list the same
      categories, and an image file in both is refused.

    Training episodes are drawn from base classes only, test and validation episodes from novel classes
    only (saved episode lists, as every DataModule). Every other argument is
    :class:`~datamodules.own_classes.OwnClassesDataModule`'s and
    :class:`~datamodules.base.EpisodeDataModule`'s (``shot``, ``image_size``, ``pool_min_pixels``,
    ``test_episodes``, ...).

    Args:
        root: Folder the relative paths below are under (and the default cache folder's parent).
        annotations: The (training) COCO instance JSON.
        images: The folder its images' ``file_name`` entries are relative to.
        test_annotations: A separate JSON of test images; None = the one-JSON split above.
        test_images: The folder of ``test_annotations``' images; default ``images``.
        novel_classes: Novel category names or ids; None = fold ``fold`` of ``num_folds`` (categories
            sorted by id, category i in fold ``i % num_folds``, as COCO-20i).
        crowd: "skip" crowd (``iscrowd``) annotations or paint them 255 ("ignore").
    """

    kind = "coco_format"

    def __init__(
        self,
        root: str = ".",
        annotations: str = "annotations/instances_default.json",
        images: str = "images",
        test_annotations: str | None = None,
        test_images: str | None = None,
        novel_classes: list[str | int] | None = None,
        crowd: Literal["skip", "ignore"] = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, novel_classes=novel_classes, **kwargs)
        if crowd not in ("skip", "ignore"):
            raise DatasetError(f"crowd must be 'skip' or 'ignore', got {crowd!r}")
        self.crowd = crowd
        self.annotations = self.root / annotations
        self.images = self.root / images
        self.test_annotations = self.root / test_annotations if test_annotations else None
        self.test_images = self.root / test_images if test_images else self.images

    def data_label(self) -> str:
        return self.annotations.stem

    def _file_source(self, ann_file: Path, image_dir: Path, ids: list[str] | None = None) -> CocoFileSource:
        return CocoFileSource(ann_file, image_dir, self.crowd, self.cache_dir, ids, self.missing_images)

    def _whole(self, split: str) -> CocoFileSource:
        """Every image of the JSON of ``split`` (the training JSON when there is one JSON)."""
        key = f"whole-{split if self.test_annotations else 'train'}"
        if key not in self._sources:
            if split == "test" and self.test_annotations is not None:
                self._sources[key] = self._file_source(self.test_annotations, self.test_images)
            else:
                self._sources[key] = self._file_source(self.annotations, self.images)
        return self._sources[key]  # type: ignore[return-value]

    def read_classes(self) -> ClassList:
        src = self._whole("train")
        classes = ClassList(src.class_names, src.category_ids, str(src.ann_file))
        if self.test_annotations is not None:
            test = self._whole("test")
            if (test.class_names, test.category_ids) != (classes.names, classes.ids):
                raise DatasetError(
                    f"{test.ann_file}: its categories differ from those of {src.ann_file} (the same ids and "
                    "names are needed in both files)"
                )
        return classes

    def make_source(self, split: str) -> SegmentationSource:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        whole = self._whole(split)
        if self.test_annotations is not None:
            if split == "test":
                self._refuse_shared_files()
            return whole
        train, test = split_by_novel(whole.image_classes(), self.novel_classes)
        ids = train if split == "train" else test
        if not ids:
            raise DatasetError(
                f"{whole.ann_file}: no image holds {'no' if split == 'train' else 'a'} novel class "
                f"({', '.join(self.class_name(c) for c in self.novel_classes)}): nothing to "
                f"{'train' if split == 'train' else 'test'} on"
            )
        return self._file_source(whole.ann_file, whole.image_dir, ids)

    def _refuse_shared_files(self) -> None:
        """Two JSONs: an image file that both list would be trained on and tested on."""
        train, test = self._whole("train"), self._whole("test")
        train_files = {(train.image_dir / train.record(i)[0]).resolve() for i in train.ids}
        for i in test.ids:
            path = (test.image_dir / test.record(i)[0]).resolve()
            if path in train_files:
                raise DatasetError(
                    f"{test.ann_file}: image {i} ({path}) is also a training image of {train.ann_file}: "
                    "a test image must not be trained on"
                )

    def split_rule(self, split: str) -> str:
        if self.test_annotations is not None:
            return str(self.annotations if split == "train" else self.test_annotations)
        holds = "without" if split == "train" else "with"
        return f"images of {self.annotations} {holds} an annotation of a novel class"
