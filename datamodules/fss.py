"""FSS-1000: 1,000 classes of 10 images, one binary mask each, split into train / val / test classes."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from .base import EpisodeDataModule
from .binary import BinaryMaskFolderSource, MaskedImage, files_with_suffix, pair_by_stem, require_dir
from .errors import DatasetError
from .protocols import ProtocolName
from .source import SegmentationSource

FSS_LAYOUT = """expected layout under the root:
  <class>/<n>.jpg, <class>/<n>.png      image and its black-and-white mask (object >= 128)
  splits/train.txt (or trn.txt), splits/test.txt, optionally splits/val.txt
                                        one class folder name per line (HSNet's data/splits/fss/ files)"""

SPLIT_FILES = {"train": ("train.txt", "trn.txt"), "val": ("val.txt",), "test": ("test.txt",)}


class FSS1000DataModule(EpisodeDataModule):
    """FSS-1000 episodes with HSNet's class split and test protocol (docs/benchmarks.md).

    Classes are numbered by split, each split sorted by name: train classes 1..T, then val, then test
    classes (HSNet: 520 / 240 / 240, test ids 761..1000). Training episodes come from the train
    classes; test and validation episodes from the test classes. By default every test image is the
    query of one test episode (``protocol="hsnet_fss"``, ``test_episodes=None``: 2,400 episodes on the
    full set) with supports drawn from its class folder (never the query, repeats allowed), scored at
    400 x 400. A fixed ``test_episodes`` draws that many queries uniformly instead. Every other
    argument is :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: FSS-1000 folder holding one folder per class.
        split_dir: Folder of ``train.txt`` (or HSNet's ``trn.txt``), ``val.txt`` (optional) and
            ``test.txt``; default ``<root>/splits``.
        image_size: Side of the square model input; HSNet and PATNet test at 400.
        protocol: Evaluation protocol; "hsnet_fss" is HSNet's.
        test_episodes: Test episodes; None = one per test image (HSNet).
        test_seed: Seed of the test episode list.
        pool_min_pixels: Object pixels an image needs to be drawn; 0 keeps every image of a class
            folder, empty masks too (HSNet's candidate list is the folder listing).
    """

    name = "fss1000"
    num_folds = 1

    def __init__(
        self,
        root: str = "data/FSS-1000",
        split_dir: str | None = None,
        image_size: int = 400,
        protocol: ProtocolName = "hsnet_fss",
        test_episodes: int | None = None,
        test_seed: int = 0,
        pool_min_pixels: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            protocol=protocol,
            test_episodes=test_episodes,  # type: ignore[arg-type]
            test_seed=test_seed,
            pool_min_pixels=pool_min_pixels,
            **kwargs,
        )
        self.split_dir = Path(split_dir) if split_dir else self.root / "splits"

    # ---- class split -----------------------------------------------------------------------------
    @cached_property
    def splits(self) -> dict[str, list[str]]:
        """split -> sorted class folder names, from the split files (checked against the folders)."""
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found: {self.root}\n{FSS_LAYOUT}")
        out: dict[str, list[str]] = {}
        seen: dict[str, Path] = {}
        for split, names in SPLIT_FILES.items():
            path = next((self.split_dir / n for n in names if (self.split_dir / n).is_file()), None)
            if path is None:
                if split == "val":
                    out[split] = []
                    continue
                raise DatasetError(
                    f"FSS-1000 {split} split file not found: {self.split_dir / names[0]}"
                    + (f" (or {self.split_dir / names[1]})" if len(names) > 1 else "")
                    + f"\n{FSS_LAYOUT}"
                )
            classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            for c in classes:
                if c in seen:
                    raise DatasetError(f"class {c!r} is listed in {seen[c]} and again in {path}")
                seen[c] = path
                if not (self.root / c).is_dir():
                    raise DatasetError(f"class {c!r} of {path} has no folder: expected {self.root / c}/")
            if not classes:
                raise DatasetError(f"split file {path} lists no class")
            out[split] = sorted(classes)
        return out

    @cached_property
    def class_ids(self) -> dict[str, int]:
        """class folder name -> global id (train, then val, then test classes, each sorted by name)."""
        order = [c for split in ("train", "val", "test") for c in self.splits[split]]
        return {c: i + 1 for i, c in enumerate(order)}

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_ids)

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.class_ids)

    def fold_novel_classes(self, fold: int) -> list[int]:
        return [self.class_ids[c] for c in self.splits["test"]]

    @property
    def base_classes(self) -> list[int]:
        return [self.class_ids[c] for c in self.splits["train"]]

    # ---- images ----------------------------------------------------------------------------------
    def make_source(self, split: str) -> SegmentationSource:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        items = []
        for c in self.splits[split]:
            folder = require_dir(self.root / c, "class folder", FSS_LAYOUT)
            images = files_with_suffix(folder, ".jpg")
            masks = files_with_suffix(folder, ".png")
            for stem, image, mask in pair_by_stem(
                images, masks, str(folder / "{stem}.png"), str(folder / "{stem}.jpg")
            ):
                items.append(MaskedImage(f"{c}/{stem}", image, mask, self.class_ids[c]))
        return BinaryMaskFolderSource(items, f"FSS-1000 {split} classes under {self.root}")

    def episode_count_and_seed(self, split: str) -> tuple[int, int]:
        """``test_episodes=None``: one test episode per test image of the class pools (HSNet)."""
        if split == "test" and self.test_episodes is None:
            pools = self.pools("test", self.novel_classes)
            return sum(len(ids) for ids in pools.values()), self.test_seed
        return super().episode_count_and_seed(split)
