"""COCO-20i: COCO 2014/2017 instance annotations rendered to semantic labels (SPEC §5)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from .base import EpisodeDataModule
from .cache import atomic_write_json, fingerprint_files, read_json
from .errors import DatasetError
from .packed import PackedList
from .source import SegmentationSource, read_rgb

COCO_LAYOUT = """expected layout under the root:
  annotations/instances_train{year}.json, annotations/instances_val{year}.json
  train{year}/<file_name>, val{year}/<file_name>     (file_name as in the JSON's "images")"""


def annotation_rle(segmentation, h: int, w: int) -> dict:
    """Compressed RLE of one annotation's polygon(s), uncompressed RLE or compressed RLE."""
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def annotation_mask(segmentation, h: int, w: int) -> np.ndarray:
    """``[h, w]`` uint8 {0, 1} of one annotation's polygon(s), uncompressed RLE or compressed RLE."""
    return mask_utils.decode(annotation_rle(segmentation, h, w))


IMAGE_FIELDS = (("file_name", str), ("height", int), ("width", int))


def _field(entry: object, key: str, kind: type | tuple[type, ...], where: str, what: str):
    """``entry[key]`` checked to be a ``kind``; a DatasetError names the file, the entry's id and the key."""
    ident = entry.get("id") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{where}: {what} {ident if ident is not None else entry!r} has no {key!r}")
    value = entry[key]
    if kind is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, str))
            or not str(value).lstrip("-").isdigit()
        ):
            raise DatasetError(f"{where}: {what} {ident}: {key!r} is {value!r}, expected an integer")
        return int(value)
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(
            f"{where}: {what} {ident}: {key!r} is a {type(value).__name__}, expected {expected}"
        )
    return value


def read_instances_json(ann_file: Path, what: str = "COCO") -> dict:
    """A COCO-style instance JSON (COCO, LVIS), checked to hold images, annotations and categories."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"invalid {what} annotation file {ann_file}: {e}") from e
    missing = [
        k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data
    ]
    if missing:
        raise DatasetError(f"invalid {what} annotation file {ann_file}: missing keys {missing}")
    return data


def group_annotations(ann_file: Path, data: dict) -> dict[str, list[dict]]:
    """str(image id) -> its annotations in file order (every listed image, possibly none).

    Raises:
        DatasetError: naming the file and the annotation: a missing or malformed field, an image or a
            category the file does not list.
    """
    where = str(ann_file)
    by_image: dict[str, list[dict]] = {}
    for im in data["images"]:
        key = str(_field(im, "id", int, where, "image"))
        if key in by_image:
            raise DatasetError(f"{where}: image id {key} is listed twice in 'images' (ids must be unique)")
        by_image[key] = []
    categories: set[int] = set()
    for c in data["categories"]:
        cid = _field(c, "id", int, where, "category")
        if cid in categories:
            raise DatasetError(
                f"{where}: category id {cid} is listed twice in 'categories' (ids must be unique)"
            )
        categories.add(cid)
    for a in data["annotations"]:
        key = str(_field(a, "image_id", int, where, "annotation"))
        if key not in by_image:
            raise DatasetError(f"{where}: annotation {a.get('id')} refers to unknown image {key}")
        category = _field(a, "category_id", int, where, "annotation")
        if category not in categories:
            raise DatasetError(f"{where}: annotation {a.get('id')} has unknown category {category}")
        segm = _field(a, "segmentation", (list, dict), where, "annotation")
        if isinstance(segm, dict) and not {"size", "counts"} <= set(segm):
            raise DatasetError(f"{where}: annotation {a.get('id')} has an RLE without 'size' and 'counts'")
        if isinstance(segm, list):
            _check_polygons(segm, where, a.get("id"))
        by_image[key].append(a)
    return by_image


def _check_polygons(segm: list, where: str, ident: object) -> None:
    """Polygons pycocotools can rasterise: a non-empty list of coordinate lists, one of 3+ points.

    (pycocotools fails on these with an IndexError or TypeError that names neither file nor annotation;
    a lone 4-number list it would even read as a box.)
    """
    if not segm:
        raise DatasetError(f"{where}: annotation {ident} has an empty 'segmentation' (no polygon, no RLE)")
    for i, part in enumerate(segm):
        if not isinstance(part, list) or not part or not isinstance(part[0], (int, float)):
            raise DatasetError(
                f"{where}: annotation {ident}: 'segmentation' polygon {i} is not a list of coordinates: "
                f"{str(part)[:60]}"
            )
    if max(len(part) for part in segm) < 6:
        raise DatasetError(
            f"{where}: annotation {ident}: 'segmentation' has no polygon of at least 3 points (6 numbers)"
        )


def render_semantic(anns: list, h: int, w: int, crowd: str = "skip") -> np.ndarray:
    """``[h, w]`` uint8 semantic label from ``(class index, iscrowd, segmentation)`` annotations.

    Annotations are painted in order, so later instances overwrite earlier ones; crowd regions are
    skipped (``crowd="skip"``) or painted 255 (``crowd="ignore"``).
    """
    # Painted in column-major order, as pycocotools decodes masks: ~3x faster than into a C-order label.
    label = np.zeros((h, w), dtype=np.uint8, order="F")
    for c, iscrowd, segm in anns:
        if iscrowd and crowd == "skip":
            continue
        label[annotation_mask(segm, h, w) > 0] = 255 if iscrowd else c
    return np.ascontiguousarray(label)


INDEX_VERSION = 2  # 2: the category ids are cached too


class COCOSource(SegmentationSource):
    """One COCO split: per image, its file, size and annotations, packed for sharing (``packed.py``).

    The instance JSON (hundreds of MB for COCO train) is parsed once into a :class:`PackedList` of
    per-image records. With ``cache_dir`` the packed index is saved there (keyed on the JSON's size and
    modification time) and later starts memory-map it: a second start takes a fraction of a second
    instead of re-parsing the JSON, and every DataLoader worker reads the same page-cache pages.

    Args:
        root: COCO folder holding ``annotations/`` and ``<split><year>/``.
        split: "train" or "val".
        year: 2014 or 2017.
        crowd: "skip" crowd annotations or paint them 255 ("ignore").
        cache_dir: where the packed index is cached; None = parse the JSON every time.
    """

    num_classes = 80

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        year: int,
        crowd: str = "skip",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        root = Path(root)
        if not root.exists():
            raise DatasetError(f"dataset root not found: {root}\n{COCO_LAYOUT.format(year=year)}")
        self.ann_file = root / "annotations" / f"instances_{split}{year}.json"
        self.image_dir = root / f"{split}{year}"
        self.crowd = crowd
        if not self.ann_file.exists():
            raise DatasetError(f"annotation file not found: {self.ann_file}\n{COCO_LAYOUT.format(year=year)}")
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}\n{COCO_LAYOUT.format(year=year)}")
        self._index(Path(cache_dir) / f"coco_index_{split}{year}" if cache_dir is not None else None)

    def _index(self, prefix: Path | None) -> None:
        """Read ``self.ann_file`` into the packed per-image records (from the cache at ``prefix`` when it
        is there and current) and set ``ids``, ``class_names`` and ``category_ids``."""
        fingerprint = fingerprint_files([self.ann_file], extra=INDEX_VERSION)
        meta = read_json(prefix.with_suffix(".json")) if prefix is not None else None
        if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint:
            self.records = PackedList.load(prefix)
            self.class_names = tuple(meta["class_names"])
            self.category_ids = tuple(meta["category_ids"])
            self._numeric_ids = np.load(prefix.with_name(prefix.name + ".ids.npy"), mmap_mode="r")
        else:
            self._parse()
            if prefix is not None:
                prefix.parent.mkdir(parents=True, exist_ok=True)
                self.records.save(prefix)
                np.save(prefix.with_name(prefix.name + ".ids.npy"), self._numeric_ids)
                atomic_write_json(
                    prefix.with_suffix(".json"),
                    {
                        "fingerprint": fingerprint,
                        "class_names": list(self.class_names),
                        "category_ids": list(self.category_ids),
                    },
                )
        # Image ids in increasing number (= the old (len, str) order of their strings).
        self.ids = [str(int(i)) for i in self._numeric_ids]
        if not self.ids:
            raise DatasetError(f"{self.ann_file} lists no images")

    def _parse(self) -> None:
        data = read_instances_json(self.ann_file)
        where = str(self.ann_file)
        cat_ids = sorted(_field(c, "id", int, where, "category") for c in data["categories"])
        self._check_categories(cat_ids)
        rank = {cid: i + 1 for i, cid in enumerate(cat_ids)}  # class index = rank of the category id
        by_id = {int(c["id"]): _field(c, "name", str, where, "category") for c in data["categories"]}
        self.class_names = tuple(by_id[cid] for cid in cat_ids)
        self.category_ids = tuple(cat_ids)
        images = {
            _field(im, "id", int, where, "image"): tuple(
                _field(im, k, t, where, "image") for k, t in IMAGE_FIELDS
            )
            for im in data["images"]
        }
        grouped = group_annotations(self.ann_file, data)
        del data
        self._numeric_ids = np.array(sorted(images), dtype=np.int64)
        self.records = PackedList.from_items(
            (
                *images[i],
                [
                    (rank[int(a["category_id"])], int(a.get("iscrowd", 0)), a["segmentation"])
                    for a in grouped[str(i)]
                ],
            )
            for i in self._numeric_ids.tolist()
        )

    def _check_categories(self, cat_ids: list[int]) -> None:
        """COCO-20i's categories: the 80 of COCO."""
        if len(cat_ids) != 80:
            raise DatasetError(
                f"invalid COCO annotation file {self.ann_file}: COCO-20i needs the 80 COCO categories, "
                f"found {len(cat_ids)}"
            )

    def record(self, image_id: str) -> tuple[str, int, int, list]:
        """(file name, height, width, [(class index, iscrowd, segmentation), ...]) of an image."""
        row = int(np.searchsorted(self._numeric_ids, int(image_id)))
        if row >= len(self._numeric_ids) or int(self._numeric_ids[row]) != int(image_id):
            raise KeyError(f"{self.ann_file} lists no image {image_id}")
        return self.records[row]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_dir / self.record(image_id)[0])

    def load_label(self, image_id: str) -> np.ndarray:
        _, h, w, anns = self.record(image_id)
        return render_semantic(anns, h, w, self.crowd)

    def fingerprint(self) -> str:
        return fingerprint_files([self.ann_file], extra=self.crowd)


class Coco20iDataModule(EpisodeDataModule):
    """COCO-20i episodes: 80 classes (rank of the category id), 4 folds of 20 novel classes.

    Training episodes come from ``train{year}``, test and validation episodes from ``val{year}``.
    Labels are rendered on the fly from the instance JSON (loaded once per process). Every other
    argument is :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: COCO folder holding ``annotations/``, ``train{year}/`` and ``val{year}/``.
        year: 2014 (HSNet's COCO-20i) or 2017 (MM-Former's code).
        split: "interleaved" (fold i novel = i+1, i+5, ..., i+77) or "contiguous" (20i+1..20i+20).
        crowd: "skip" crowd annotations (default) or paint them 255 ("ignore").
    """

    name = "coco20i"
    num_classes = 80

    def __init__(
        self,
        root: str = "data/coco",
        year: int = 2014,
        split: Literal["interleaved", "contiguous"] = "interleaved",
        crowd: Literal["skip", "ignore"] = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if year not in (2014, 2017):
            raise DatasetError(f"year must be 2014 or 2017, got {year}")
        if split not in ("interleaved", "contiguous"):
            raise DatasetError(f"split must be 'interleaved' or 'contiguous', got {split!r}")
        if crowd not in ("skip", "ignore"):
            raise DatasetError(f"crowd must be 'skip' or 'ignore', got {crowd!r}")
        self.year, self.split, self.crowd = year, split, crowd
        self.name = f"coco20i{year}_{split}_{crowd}"

    def fold_novel_classes(self, fold: int) -> list[int]:
        if self.split == "contiguous":
            return list(range(20 * fold + 1, 20 * fold + 21))
        return list(range(fold + 1, 81, 4))

    def make_source(self, split: str) -> SegmentationSource:
        src = COCOSource(
            self.root, "train" if split == "train" else "val", self.year, self.crowd, self.cache_dir
        )
        self.class_names = src.class_names
        return src
