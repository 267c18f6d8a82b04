"""Class-index label maps -> a COCO ``annotations.json`` that annotation tools import (pycocotools RLE).

One :class:`CocoAnnotations` collects the queries of a run: ``images`` (``file_name`` relative to the
queries folder, ``width``, ``height``), ``categories`` (id i = label value i, the class names), and per
query and class present an annotation whose ``segmentation`` is a compressed RLE (pycocotools'
``{"size": [h, w], "counts": str}``), with ``area``, ``bbox`` ``[x, y, w, h]``, ``iscrowd`` 0 and a
``score`` (the mean probability of the class over the annotation's pixels). ``instances=True`` splits a
class into its connected components (8-connectivity), one annotation each.

Built for a folder command, a page and a multi-process writer alike:

* resume: :meth:`CocoAnnotations.load_or_new` reads an existing file (same classes required) and new
  queries continue its image and annotation ids; adding a file name already present replaces it;
* :func:`merge` joins partial files (one per rank, or an old file and new parts) into one with unique
  ids, a later part's image replacing an earlier one of the same file name;
* :meth:`CocoAnnotations.write` is atomic (``fewshot_seg.atomic``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from fewshot_seg.atomic import write_text_atomic

ANNOTATIONS_FILE = "annotations.json"


class AnnotationsError(ValueError):
    """An annotations file that cannot be read or completed; the message names the file."""


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """``[H, W]`` bool / {0, 1} mask -> compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_annotation(mask: np.ndarray, category_id: int, score: float) -> dict[str, Any]:
    """One annotation (no ids yet) of a non-empty mask: RLE ``segmentation``, ``area``, ``bbox``, score."""
    rle = encode_rle(mask)
    return {
        "category_id": int(category_id),
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        "score": round(float(score), 6),
    }


def label_annotations(
    labels: np.ndarray, n_classes: int, confidence: np.ndarray | None = None, instances: bool = False
) -> list[dict[str, Any]]:
    """The annotations (without ids) of one label map: per class present one (or one per component).

    Args:
        labels: ``[H, W]`` uint8, 0 background, i = class i (1..n_classes); other values are not annotated.
        n_classes: the number of classes.
        confidence: ``[H, W]`` float in [0, 1] (``ClassSegmentation.confidence``); an annotation's ``score``
            is its mean over the annotation's pixels. None: score 1.0 (a label map given without scores).
        instances: one annotation per connected component (8-connectivity) instead of one per class.
    """
    out = []
    for c in range(1, n_classes + 1):
        region = labels == c
        if not region.any():
            continue
        if instances:
            count, components = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
            parts = [components == k for k in range(1, count)]
        else:
            parts = [region]
        for part in parts:
            score = float(confidence[part].mean()) if confidence is not None else 1.0
            out.append(mask_annotation(part, c, score))
    return out


class CocoAnnotations:
    """The images and annotations of a labelled folder, for one list of classes (category id i = class i).

    Args:
        class_names: the classes in label order (label value i = ``class_names[i - 1]``).
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = [str(n) for n in class_names]
        self._images: dict[str, dict[str, Any]] = {}  # file_name -> image record, in insertion order
        self._annotations: dict[str, list[dict[str, Any]]] = {}  # file_name -> its annotations
        self._next_image_id = 1
        self._next_annotation_id = 1

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Any, source: str = "annotations") -> CocoAnnotations:
        """A collection from COCO JSON data (ids kept; the next ones continue after the largest)."""
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            images, annotations = list(data["images"]), list(data["annotations"])
        except (KeyError, TypeError, ValueError) as err:
            raise AnnotationsError(
                f"{source} is not a COCO annotations file (images, annotations, categories): {err}"
            ) from err
        if [int(c["id"]) for c in categories] != list(range(1, len(categories) + 1)):
            raise AnnotationsError(f"{source}: category ids must be 1..N (the label values)")
        out = cls([c["name"] for c in categories])
        by_id: dict[int, str] = {}
        for image in images:
            name, image_id = str(image["file_name"]), int(image["id"])
            if name in out._images or image_id in by_id:
                raise AnnotationsError(f"{source}: image {name!r} (id {image_id}) is listed twice")
            by_id[image_id] = name
            out._images[name] = dict(image)
            out._annotations[name] = []
        seen: set[int] = set()
        for ann in annotations:
            ann_id, image_id = int(ann["id"]), int(ann["image_id"])
            if ann_id in seen or image_id not in by_id:
                raise AnnotationsError(f"{source}: annotation id {ann_id} is repeated or names no image")
            seen.add(ann_id)
            out._annotations[by_id[image_id]].append(dict(ann))
        out._next_image_id = max(by_id, default=0) + 1
        out._next_annotation_id = max(seen, default=0) + 1
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> CocoAnnotations:
        """Read ``path``; with ``class_names``, refuse a file made for other classes (naming both lists)."""
        name = os.fspath(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise AnnotationsError(f"annotations file is missing: {name}") from err
        except (OSError, ValueError) as err:
            raise AnnotationsError(f"cannot read annotations file {name}: {err}") from err
        out = cls.from_dict(data, name)
        if class_names is not None and out.class_names != [str(n) for n in class_names]:
            raise AnnotationsError(
                f"annotations file {name} has the classes {out.class_names}, this run {list(class_names)}: "
                "use another output folder or the same classes"
            )
        return out

    @classmethod
    def load_or_new(cls, path: str | os.PathLike, class_names: Sequence[str]) -> CocoAnnotations:
        """The file at ``path`` to complete (a resumed run), or an empty collection where there is none."""
        return cls.load(path, class_names) if Path(path).is_file() else cls(class_names)

    # ------------------------------------------------------------------ adding
    def __contains__(self, file_name: object) -> bool:
        return file_name in self._images

    def __len__(self) -> int:
        return len(self._images)

    @property
    def file_names(self) -> list[str]:
        return list(self._images)

    def add(
        self,
        file_name: str,
        labels: np.ndarray,
        confidence: np.ndarray | None = None,
        instances: bool = False,
    ) -> int:
        """Add one query's label map (see :func:`label_annotations`); returns its image id.

        A file name already present is replaced: it keeps its image id, its annotations get new ids.
        """
        h, w = labels.shape[:2]
        return self.add_annotations(
            file_name, w, h, label_annotations(labels, len(self.class_names), confidence, instances)
        )

    def add_annotations(self, file_name: str, width: int, height: int, annotations: Sequence[dict]) -> int:
        """Add an image record and its annotations (their ``id`` / ``image_id`` are assigned here)."""
        for ann in annotations:
            if not 1 <= int(ann["category_id"]) <= len(self.class_names):
                raise AnnotationsError(
                    f"{file_name}: category {ann['category_id']} is no class (1..{len(self.class_names)})"
                )
        old = self._images.get(file_name)
        image_id = int(old["id"]) if old else self._next_image_id
        if old is None:
            self._next_image_id += 1
        self._images[file_name] = {
            "id": image_id,
            "file_name": file_name,
            "width": int(width),
            "height": int(height),
        }
        anns = []
        for ann in annotations:
            anns.append({**ann, "id": self._next_annotation_id, "image_id": image_id})
            self._next_annotation_id += 1
        self._annotations[file_name] = anns
        return image_id

    def remove(self, file_name: str) -> None:
        """Forget an image and its annotations (ids are not reused)."""
        self._images.pop(file_name, None)
        self._annotations.pop(file_name, None)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """COCO JSON data: ``images``, ``annotations`` (in id order), ``categories``."""
        images = sorted(self._images.values(), key=lambda im: im["id"])
        anns = sorted((a for name in self._images for a in self._annotations[name]), key=lambda a: a["id"])
        return {
            "info": {"description": "fewshot-seg few-shot pre-labels"},
            "images": images,
            "annotations": anns,
            "categories": [
                {"id": i, "name": n, "supercategory": ""} for i, n in enumerate(self.class_names, 1)
            ],
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a temporary file renamed: never a half-written file)."""
        return write_text_atomic(path, json.dumps(self.to_dict()))


def merge(
    parts: Sequence[CocoAnnotations | str | os.PathLike], class_names: Sequence[str] | None = None
) -> CocoAnnotations:
    """One collection from several (files or collections), in order, with unique ids.

    All parts must have the same classes (``class_names`` when given, else the first part's). Images are
    taken in order and numbered afresh (the first part keeps consecutive ids 1..n); a file name that a
    later part holds again replaces the earlier record and annotations, so a query re-done on resume or
    by another rank appears once.

    Raises:
        AnnotationsError: naming the part whose classes differ or that cannot be read.
    """
    loaded = [p if isinstance(p, CocoAnnotations) else CocoAnnotations.load(p, class_names) for p in parts]
    names = list(class_names) if class_names is not None else (loaded[0].class_names if loaded else None)
    if names is None:
        raise AnnotationsError("merge needs at least one part or the class names")
    out = CocoAnnotations(names)
    for i, part in enumerate(loaded):
        if part.class_names != out.class_names:
            raise AnnotationsError(
                f"part {i} of the merge has the classes {part.class_names}, not {out.class_names}"
            )
        for file_name, image in part._images.items():
            anns = [
                {k: v for k, v in a.items() if k not in ("id", "image_id")}
                for a in part._annotations[file_name]
            ]
            out.add_annotations(file_name, image["width"], image["height"], anns)
    return out


__all__ = [
    "ANNOTATIONS_FILE",
    "AnnotationsError",
    "CocoAnnotations",
    "encode_rle",
    "label_annotations",
    "mask_annotation",
    "merge",
]
