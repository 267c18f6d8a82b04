"""What the DataModules of a user's own labelled data share: their classes, the class split, the image split.

:class:`OwnClassesDataModule` is an :class:`~datamodules.base.EpisodeDataModule` whose classes are read
from the data (COCO categories, ``classes.txt``) instead of a benchmark's fixed list, and whose novel
classes are named by the user (``novel_classes``) or drawn from ``fold`` / ``num_folds`` as COCO-20i does.
Pools, the pixel rule, saved episode lists, provenance and loaders are the base class's; the subclasses
(:mod:`datamodules.coco_format`, :mod:`datamodules.mask_folder`) only say where images and labels are.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any, Literal, NamedTuple

from .base import EpisodeDataModule
from .errors import DatasetError

MAX_CLASSES = 254
"""Classes a uint8 label holds besides background 0 and ignore 255."""

MissingImages = Literal["error", "skip"]


class ClassList(NamedTuple):
    """The classes of a dataset in label order: label ``i + 1`` is ``names[i]``, user id ``ids[i]``."""

    names: tuple[str, ...]
    ids: tuple[int, ...]
    where: str
    """The file that lists them (named by errors)."""


def check_class_list(classes: ClassList) -> ClassList:
    """Refuse an empty list, more classes than a uint8 label holds, and a name given to two classes."""
    if not classes.names:
        raise DatasetError(f"{classes.where}: no class is listed")
    if len(classes.names) > MAX_CLASSES:
        raise DatasetError(
            f"{classes.where}: {len(classes.names)} classes, more than the {MAX_CLASSES} a uint8 label holds"
        )
    seen: dict[str, int] = {}
    for name, cid in zip(classes.names, classes.ids, strict=True):
        if name in seen:
            raise DatasetError(
                f"{classes.where}: classes {seen[name]} and {cid} are both named {name!r} (names must be "
                "unique)"
            )
        seen[name] = cid
    return classes


def resolve_classes(requested: Sequence[str | int], classes: ClassList, what: str) -> list[int]:
    """Sorted labels (1..C) of ``requested`` class names or ids; an unknown one is named with a guess.

    A string is a name first (a class may be called "3"), else an id; an integer is an id.
    """
    by_name = {n: i + 1 for i, n in enumerate(classes.names)}
    by_id = {cid: i + 1 for i, cid in enumerate(classes.ids)}
    out: list[int] = []
    for entry in requested:
        if isinstance(entry, str) and entry in by_name:
            out.append(by_name[entry])
        elif str(entry).lstrip("-").isdigit() and int(entry) in by_id:
            out.append(by_id[int(entry)])
        else:
            guess = difflib.get_close_matches(str(entry), classes.names, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise DatasetError(
                f"{what}: {entry!r} is not a class of {classes.where}{hint}; its classes are "
                f"{', '.join(classes.names[:12])}{', ...' if len(classes.names) > 12 else ''}"
            )
    if len(set(out)) != len(out):
        raise DatasetError(f"{what}: a class is listed twice in {list(requested)}")
    return sorted(out)


def fold_classes(num_classes: int, fold: int, num_folds: int) -> list[int]:
    """Labels of ``fold``: class i of the id-sorted list (0-based) is in fold ``i % num_folds`` (COCO-20i)."""
    return [i + 1 for i in range(num_classes) if i % num_folds == fold]


def split_by_novel(held: Mapping[str, Iterable[int]], novel: Iterable[int]) -> tuple[list[str], list[str]]:
    """(training, test) images of one file: an image holding a novel class is a test image, any other a
    training image, so no training episode ever shows a novel object and no test image is trained on."""
    novel_set = set(novel)
    train, test = [], []
    for image_id, classes in held.items():
        (test if novel_set.intersection(classes) else train).append(image_id)
    return train, test


def drop_missing(
    ids: list[str], missing: list[tuple[str, str]], policy: MissingImages, what: str
) -> list[str]:
    """``ids`` without those of ``missing`` ((id, file) of images not on disk): refused (``"error"``, the
    first one named) or left out with one warning (``"skip"``)."""
    if not missing:
        return ids
    first_id, first_file = missing[0]
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    if policy == "error":
        raise DatasetError(
            f"{what}: image {first_id!r} is missing: {first_file} not found{more} (fix the path, or set "
            "missing_images: skip to use the other images)"
        )
    warnings.warn(
        f"{what}: {len(missing)} listed image(s) missing, left out: {first_file}{more}", stacklevel=2
    )
    gone = {i for i, _ in missing}
    return [i for i in ids if i not in gone]


class OwnClassesDataModule(EpisodeDataModule):
    """Episodes on a user's labelled images: classes from the data, novel classes chosen by the user.

    Subclasses read their class list (:meth:`read_classes`) and build the sources; the novel classes are
    ``novel_classes`` (names or ids) or fold ``fold`` of ``num_folds`` (class i of the id-sorted list is
    in fold ``i % num_folds``). Training episodes use the other (base) classes only, test and validation
    episodes the novel ones (the base class's rule).

    Args:
        root: Folder of the data (relative paths of the subclass's arguments are under it); caches go
            to ``<root>/fewshot_cache`` unless ``cache_dir`` says otherwise.
        novel_classes: Novel class names or ids; None = fold ``fold`` of ``num_folds``.
        fold: Fold of novel classes (0 with ``novel_classes``).
        num_folds: Folds the classes are dealt into when ``novel_classes`` is None.
        missing_images: An image listed but not on disk: "error" (named) or "skip" (left out, warned).
        dataset_name: Name in results, run folders and provenance; default ``<kind>_<file or folder>``
            (with a short digest of ``novel_classes`` when given).
    """

    kind = "own"

    def __init__(
        self,
        root: str,
        novel_classes: list[str | int] | None = None,
        fold: int = 0,
        num_folds: int = 4,
        missing_images: MissingImages = "error",
        dataset_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if novel_classes is not None:
            if not novel_classes:
                raise DatasetError("novel_classes is empty: name at least one class (or leave it unset)")
            if fold != 0:
                raise DatasetError(f"fold={fold} with novel_classes: the novel classes are the fold (use 0)")
            num_folds = 1
        if num_folds < 1:
            raise DatasetError(f"num_folds must be at least 1, got {num_folds}")
        if missing_images not in ("error", "skip"):
            raise DatasetError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        self.num_folds = num_folds  # read by the base class's fold check
        super().__init__(root=root, fold=fold, **kwargs)
        self.requested_novel = list(novel_classes) if novel_classes is not None else None
        self.missing_images = missing_images
        self._dataset_name = dataset_name

    # ---- what a subclass defines -----------------------------------------------------------------
    @abstractmethod
    def read_classes(self) -> ClassList:
        """The dataset's classes in label order."""

    @abstractmethod
    def data_label(self) -> str:
        """A short readable name of the data (file or folder stem) for the default dataset name."""

    # ---- classes ---------------------------------------------------------------------------------
    @cached_property
    def classes(self) -> ClassList:
        return check_class_list(self.read_classes())

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes.names)

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.classes.names

    @property
    def name(self) -> str:  # type: ignore[override]
        if self._dataset_name:
            return self._dataset_name
        base = f"{self.kind}_{self.data_label()}"
        if self.requested_novel is None:
            return base
        digest = hashlib.sha1(repr([self.class_name(c) for c in self.novel_classes]).encode()).hexdigest()
        return f"{base}_novel-{digest[:6]}"  # another split: other caches and episode lists

    def fold_novel_classes(self, fold: int) -> list[int]:
        if self.requested_novel is not None:
            return resolve_classes(self.requested_novel, self.classes, "novel_classes")
        novel = fold_classes(self.num_classes, fold, self.num_folds)
        if not novel:
            raise DatasetError(
                f"{self.classes.where}: fold {fold} of {self.num_folds} holds no class ({self.num_classes} "
                "classes): lower num_folds or name novel_classes"
            )
        return novel

    def pools_description(self, split: str) -> str:
        return f"{self.classes.where} ({self.name} fold {self.fold}) {split}"

    def provenance(self) -> dict[str, Any]:
        """The base record plus the user's class ids and which images each split reads."""
        return {
            **super().provenance(),
            "class_ids": {str(i + 1): cid for i, cid in enumerate(self.classes.ids)},
            "classes_file": self.classes.where,
            "images": {split: self.split_rule(split) for split in ("train", "test")},
        }

    @abstractmethod
    def split_rule(self, split: str) -> str:
        """In words, which images ``split`` ("train", "test") reads (recorded in the provenance)."""
