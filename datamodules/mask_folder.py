"""A folder of images with class-index PNG masks (mmsegmentation's custom layout) as few-shot episodes.

<root>/images/<name>.<ext>     any format PIL reads
<root>/masks/<name>.png        0 = background, 1..C = classes, 255 = ignore (greyscale or palette PNG)
<root>/classes.txt             one class name a line: line i = class i (a first line "background" is
                               class 0 and may be there or not)
<root>/splits/{train,test,val}.txt   optional: image names, one a line (val.txt optional)
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .binary import files_with_suffix, pair_by_stem, require_dir
from .cache import fingerprint_files
from .errors import DatasetError
from .own_classes import ClassList, OwnClassesDataModule, drop_missing, split_by_novel
from .source import ClassCounts, SegmentationSource, read_label_png, read_rgb

MASK_FOLDER_LAYOUT = __doc__.split("\n\n")[1].rstrip()
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BACKGROUND_NAMES = ("background", "_background_", "__background__")
SPLITS = ("train", "val", "test")


def read_class_names(path: Path) -> ClassList:
    """The classes of ``classes.txt`` (line i = class i; a leading background line is class 0)."""
    if not path.is_file():
        raise DatasetError(f"class list not found: {path}\nexpected layout:\n{MASK_FOLDER_LAYOUT}")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    for i, n in enumerate(names, start=1):
        if not n:
            raise DatasetError(f"{path}: line for class {i} is empty (one class name a line)")
    return ClassList(tuple(names), tuple(range(1, len(names) + 1)), str(path))


def image_files(folder: Path) -> dict[str, Path]:
    """name -> image file of ``folder``; two images of one name (``a.jpg``, ``a.png``) are refused."""
    out: dict[str, Path] = {}
    for suffix in IMAGE_SUFFIXES:
        for stem, path in files_with_suffix(folder, suffix).items():
            if stem in out:
                raise DatasetError(f"image name {stem!r} is used twice: {out[stem]} and {path}")
            out[stem] = path
    return out


def _stem(name: str) -> str:
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


class MaskFolderSource(SegmentationSource):
    """The images ``ids`` of a mask folder, labels read as class-index PNGs checked to hold {0..C, 255}."""

    def __init__(
        self, images: dict[str, Path], masks: dict[str, Path], ids: list[str], num_classes: int
    ) -> None:
        self.images, self.masks, self.ids, self.num_classes = images, masks, ids, num_classes

    def load_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.images[image_id])

    def load_label(self, image_id: str) -> np.ndarray:
        return read_label_png(self.masks[image_id], self.num_classes)

    def fingerprint(self) -> str:
        digest = hashlib.sha1(json.dumps(self.ids).encode()).hexdigest()
        return fingerprint_files((self.masks[i] for i in self.ids), extra=[self.num_classes, digest])


class MaskFolderDataModule(OwnClassesDataModule):
    """Few-shot episodes on your own images with class-index PNG masks, with your own class split.

    Which images each split reads: with ``splits/train.txt`` and ``splits/test.txt`` the images they
    list (and ``splits/val.txt``'s for validation, else the test images); without split files the images
    whose mask holds a novel class are the test (and validation) images and all others the training
    images, so a training episode never shows a novel object. An image listed in two split files is
    refused. Training episodes are drawn from base classes only, test and validation episodes from
    novel classes only. Every other argument is :class:`~datamodules.own_classes.OwnClassesDataModule`'s
    and :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: Folder holding ``images/``, ``masks/``, ``classes.txt`` and optionally ``splits/``.
        novel_classes: Novel class names (of ``classes.txt``) or ids (mask values); None = fold ``fold``
            of ``num_folds`` (class i, 0-based, in fold ``i % num_folds``).
    """

    kind = "mask_folder"

    def __init__(
        self, root: str = "data/my_masks", novel_classes: list[str | int] | None = None, **kwargs: Any
    ):
        super().__init__(root=root, novel_classes=novel_classes, **kwargs)

    def data_label(self) -> str:
        return self.root.resolve().name

    def read_classes(self) -> ClassList:
        return read_class_names(self.root / "classes.txt")

    @cached_property
    def files(self) -> tuple[dict[str, Path], dict[str, Path]]:
        """(name -> image, name -> mask) of every image with a mask (a mask without an image is refused)."""
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found: {self.root}\nexpected layout:\n{MASK_FOLDER_LAYOUT}")
        image_dir = require_dir(self.root / "images", "image folder", MASK_FOLDER_LAYOUT)
        mask_dir = require_dir(self.root / "masks", "mask folder", MASK_FOLDER_LAYOUT)
        images, masks = image_files(image_dir), files_with_suffix(mask_dir, ".png")
        paired = pair_by_stem(images, masks, str(mask_dir / "{stem}.png"), str(image_dir / "{stem}.<ext>"))
        return {s: i for s, i, _ in paired}, {s: m for s, _, m in paired}

    @cached_property
    def split_lists(self) -> dict[str, list[str]] | None:
        """split -> image names of ``splits/<split>.txt`` (None without split files), checked."""
        folder = self.root / "splits"
        if not folder.is_dir():
            return None
        lists: dict[str, tuple[Path, list[str]]] = {}
        seen: dict[str, Path] = {}
        for split in SPLITS:
            path = folder / f"{split}.txt"
            if not path.is_file():
                if split != "val":
                    raise DatasetError(f"split file not found: {path} (splits/ needs train.txt and test.txt)")
                continue
            # A name with its image suffix ("a.jpg") is the name "a".
            names = [_stem(line.strip()) for line in path.read_text().splitlines() if line.strip()]
            for n in names:  # an image in two splits would be trained on and tested on
                if n in seen:
                    raise DatasetError(f"{path}: image {n!r} is listed again (already in {seen[n]})")
                seen[n] = path
            lists[split] = (path, names)
        masks = self.files[1]
        out: dict[str, list[str]] = {}
        for split, (path, names) in lists.items():
            missing = [(n, str(self.root / "images" / f"{n}.<ext>")) for n in names if n not in masks]
            out[split] = drop_missing(names, missing, self.missing_images, str(path))
        return out

    def _all(self) -> MaskFolderSource:
        """Every image of the folder (the split without split files reads its class counts)."""
        if "all" not in self._sources:
            images, masks = self.files
            self._sources["all"] = MaskFolderSource(images, masks, sorted(masks), self.num_classes)
        return self._sources["all"]  # type: ignore[return-value]

    def make_source(self, split: str) -> SegmentationSource:
        images, masks = self.files
        if self.split_lists is not None:
            ids = self.split_lists.get(split, [])
        elif split in ("train", "test"):
            counts = self.class_counts("all")
            train, test = split_by_novel(
                {i: [c for c, n in v.items() if n] for i, v in counts.items()}, self.novel_classes
            )
            ids = train if split == "train" else test
        else:
            ids = []
        if not ids:
            raise DatasetError(f"{self.root}: no {split} image ({self.split_rule(split)})")
        return MaskFolderSource(images, masks, sorted(ids), self.num_classes)

    def source(self, split: str) -> SegmentationSource:
        return self._all() if split == "all" else super().source(split)

    def class_counts(self, split: str) -> ClassCounts:
        """Counted once over every image (cached), and read from there for each split."""
        everything = self._all().class_counts(
            self.cache_dir / f"{self.kind}_{self.data_label()}_class_counts.json", f"{self.name} masks"
        )
        if split == "all":
            return everything
        return {i: everything[i] for i in self.source(split).ids}

    def eval_images(self, split: str) -> str:
        return (
            "val" if split == "val" and self.split_lists is not None and "val" in self.split_lists else "test"
        )

    def split_rule(self, split: str) -> str:
        if self.split_lists is not None:
            return str(self.root / "splits" / f"{split}.txt")
        holds = "without" if split == "train" else "with"
        return f"images of {self.root / 'masks'} {holds} a novel class"
