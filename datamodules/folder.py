"""Episodes from user folders of supports and queries, for ``predict`` (and ``test`` with query masks)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from fewshot_seg.episode import IGNORE_INDEX, collate_episodes
from fewshot_seg.user_images import (
    MASK_CONVENTION,
    check_same_size,
    read_user_image,
    read_user_mask,
    require_object,
    require_object_resized,
    scan_images,
)

from .episodes import episode_sample
from .errors import DatasetError
from .protocols import ProtocolName, get_protocol
from .transforms import TestTransform

FOLDER_LAYOUT = f"""expected layout under the root:
  supports/<name>.<ext>                  support images (any format PIL reads: jpg, png, webp, bmp, tif, ...)
  supports/<name>_mask.png  or  masks/<name>.png   their masks ({MASK_CONVENTION})
  queries/[<sub>/]<name>.<ext>           query images, also in sub-folders
  queries/[<sub>/]<name>_mask.png        optional query masks, same convention (enables scoring)"""


def _mask_for(image: Path, mask_dir: Path | None) -> Path | None:
    own = image.with_name(f"{image.stem}_mask.png")
    if own.exists():
        return own
    if mask_dir is not None and (mask_dir / f"{image.stem}.png").exists():
        return mask_dir / f"{image.stem}.png"
    return None


class FolderEpisodes(Dataset):
    """Every readable query of ``queries/`` (and its sub-folders) paired with the K supports of ``supports/``.

    Queries are checked when the dataset is built (decoded, mask size compared): one that cannot be
    used is listed in :attr:`failed` with the reason and left out, so the others are still predicted.
    Query ids are the paths relative to ``queries/`` *with* their extension (``a.jpg`` and ``a.png``
    are two queries). Supports must all be usable (no prediction without them). Images are read as
    displayed (EXIF orientation) and masks by one convention (``fewshot_seg.user_images``).

    Args:
        root: the episode folder.
        transform: the evaluation protocol's resizing.
        class_id: the class id the episodes report.
        shot: the first ``shot`` supports by name; None = all.
        scored_only: keep only the queries that have a mask (``test``); the others are listed in
            :attr:`unscored`.
    """

    def __init__(
        self,
        root: Path,
        transform: TestTransform,
        class_id: int,
        shot: int | None,
        scored_only: bool = False,
    ) -> None:
        sup_dir, qry_dir, mask_dir = root / "supports", root / "queries", root / "masks"
        for d in (root, sup_dir, qry_dir):
            if not d.is_dir():
                raise DatasetError(f"folder not found: {d}\n{FOLDER_LAYOUT}")
        supports, sup_unsupported = scan_images(sup_dir, recursive=False)
        if not supports:
            raise DatasetError(f"no support images in {sup_dir}\n{FOLDER_LAYOUT}")
        self.supports: list[tuple[Path, Path]] = []
        for s in supports:
            m = _mask_for(s, mask_dir if mask_dir.is_dir() else None)
            if m is None:
                raise DatasetError(
                    f"support image {s} has no mask: expected {s.with_name(s.stem + '_mask.png')} "
                    f"or {mask_dir / (s.stem + '.png')}"
                )
            self.supports.append((s, m))
        if shot is not None:
            if not 1 <= shot <= len(self.supports):
                raise DatasetError(f"shot={shot} but {sup_dir} holds {len(self.supports)} supports")
            self.supports = self.supports[:shot]
        self.transform = transform
        self.class_id = class_id
        self._support_cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        for s, m in self.supports:
            require_object(_pair(s, m)[1], f"support mask {m}")
        self._supports()  # resized once here: an object that vanishes at the model size is refused now
        queries, unsupported = scan_images(qry_dir, recursive=True)
        self.unsupported = [str(p) for p in sup_unsupported + unsupported]
        self.failed: list[tuple[str, str]] = []
        self.unscored: list[str] = []
        self.queries: list[tuple[Path, Path | None, str]] = []
        for q in queries:
            m = _mask_for(q, None)
            if m is None and scored_only:
                self.unscored.append(str(q))
                continue
            try:
                if m is not None:
                    _pair(q, m)
                else:
                    read_user_image(q, "image")
            except DatasetError as err:
                self.failed.append((str(q), str(err)))
                continue
            self.queries.append((q, m, q.relative_to(qry_dir).as_posix()))
        if not self.queries:
            problems = "; ".join(f"{p}: {why}" for p, why in self.failed)
            if scored_only and self.unscored:
                problems = f"scoring needs query masks <name>_mask.png; none of {len(self.unscored)} has one"
            raise DatasetError(
                f"no usable query image in {qry_dir}{' (' + problems + ')' if problems else ''}"
            )

    def __len__(self) -> int:
        return len(self.queries)

    def _semantic(self, mask: np.ndarray) -> np.ndarray:
        """{0, 1, 255} mask -> semantic label {0, class_id, 255}, the form episodes are built from."""
        return np.where(mask == 1, np.uint8(self.class_id), mask).astype(np.uint8)

    def _supports(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._support_cache is None:  # the same K supports serve every query
            self._support_cache = []
            for s, m in self.supports:
                img, lab, _ = self.transform(*_pair(s, m))
                require_object_resized(lab, f"support mask {m}", self.transform.image_size)
                self._support_cache.append((img, self._semantic(lab)))
        return self._support_cache

    def __getitem__(self, index: int) -> dict:
        q, m, query_id = self.queries[index]
        if m is not None:
            image, label = _pair(q, m)
        else:
            image = read_user_image(q, "image")
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        q_img, q_lab, valid = self.transform(image, label)
        orig = q_lab if self.transform.square else label
        return episode_sample(
            query=q_img,
            query_label=self._semantic(q_lab),
            supports=self._supports(),
            class_id=self.class_id,
            novel_classes=(),
            query_id=query_id,
            support_ids=[s.name for s, _ in self.supports],
            valid_size=valid,
            scored_label=self._semantic(orig),
        )


def _pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(``[H, W, 3]`` uint8 RGB, ``[H, W]`` {0, 1, 255}) of an image and its mask, checked to fit."""
    image, mask = read_user_image(image_path, "image"), read_user_mask(mask_path, "mask")
    check_same_size(mask, image, f"mask {mask_path}", f"image {image_path}")
    return image, mask


class FolderEpisodeDataModule(pl.LightningDataModule):
    """Segment one object class in your own images, given K annotated supports.

    Layout of ``root``: ``supports/<name>.<ext>`` with a mask ``supports/<name>_mask.png`` or
    ``masks/<name>.png``; ``queries/<name>.<ext>`` with optional ``queries/<name>_mask.png``. Masks
    follow ``fewshot_seg.user_images.MASK_CONVENTION`` ({0, 255} or {0, 1}: binary; class ids: 0
    background, 255 ignore, any other value the object; anti-aliased / JPEG: >= 128); images are read
    as displayed (EXIF orientation). Every query is paired with all supports (sorted by file name).
    ``predict`` segments every query (those without a mask get all-255 labels); ``test`` scores only
    the queries with a mask and names the others.

    Args:
        root: Folder holding ``supports/``, ``queries/`` and optionally ``masks/``.
        shot: Number of supports to use (the first ``shot`` by name); None = all of them.
        image_size: Side of the square model input.
        batch_size: Queries per batch.
        num_workers: DataLoader worker processes.
        protocol: scoring resolution: "spec" (keep aspect, pad, scored at the original size), or
            "square480" / "mmformer" (stretched to image_size squares and scored there).
        class_id: Class id reported in ``EpisodeBatch.class_id`` and ``novel_classes``.
    """

    def __init__(
        self,
        root: str = "my_episode",
        shot: int | None = None,
        image_size: int = 480,
        batch_size: int = 1,
        num_workers: int = 0,
        protocol: ProtocolName = "spec",
        class_id: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= class_id < IGNORE_INDEX:
            raise DatasetError(f"class_id must be in 1..{IGNORE_INDEX - 1}, got {class_id}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.shot, self.image_size = shot, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.protocol, self.class_id = protocol, class_id
        self._dataset: FolderEpisodes | None = None

    name = "folder"

    @property
    def base_classes(self) -> list[int]:
        return []

    @property
    def novel_classes(self) -> list[int]:
        return [self.class_id]

    @property
    def query_dir(self) -> Path:
        """The folder of the query images (``predict`` refuses to write its outputs inside it)."""
        return self.root / "queries"

    @property
    def episode_shot(self) -> int | None:
        """The number of supports every episode uses (known once a loader is built)."""
        return len(self._dataset.supports) if self._dataset is not None else self.shot

    def eval_dataset(self, split: str = "predict") -> FolderEpisodes:
        return FolderEpisodes(
            self.root,
            TestTransform(self.image_size, get_protocol(self.protocol).square),
            self.class_id,
            self.shot,
            scored_only=split == "test",
        )

    @property
    def query_ids(self) -> list[str]:
        """The ids of the queries of the last loader built (paths under ``queries/``, extensions kept)."""
        return [query_id for _, _, query_id in self._dataset.queries] if self._dataset is not None else []

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(query file, reason) of every query left out of the last loader built."""
        return self._dataset.failed if self._dataset is not None else []

    @property
    def unsupported(self) -> list[str]:
        """Files of ``supports/`` and ``queries/`` that are no image PIL reads (and no mask)."""
        return self._dataset.unsupported if self._dataset is not None else []

    def _loader(self, split: str) -> DataLoader:
        self._dataset = self.eval_dataset(split)
        if self._dataset.unscored:
            n = len(self._dataset.unscored)
            print(
                f"{n} quer{'y' if n == 1 else 'ies'} without a mask not scored: "
                + ", ".join(self._dataset.unscored),
                file=sys.stderr,
            )
        return DataLoader(
            self._dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
