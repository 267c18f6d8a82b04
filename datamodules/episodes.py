"""Episode sampling shared by every DataModule: training episodes, saved test/val episode lists.

Samples are dicts with the ``EpisodeBatch`` fields (no batch dimension), stacked by
``fewshot_seg.episode.collate_episodes``. Masks travel as uint8 (cheaper between worker processes);
the collate function turns them into int64.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fewshot_seg.episode import IGNORE_INDEX

from .cache import atomic_write_json, read_json
from .errors import DatasetError
from .protocols import Episode, EvalProtocol
from .source import SegmentationSource
from .transforms import TestTransform, TrainAugment, normalize_image

EPISODE_LIST_VERSION = 1


def binary_label(label: np.ndarray, class_id: int) -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1, 255}: 1 where ``class_id``, 255 kept, 0 elsewhere (other classes too)."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def semantic_label(label: np.ndarray, novel_classes: Sequence[int]) -> np.ndarray:
    """``[H, W]`` uint8 semantic label with the fold's novel classes set to 255 (stage-1 targets)."""
    out = label.copy()
    if len(novel_classes):
        out[np.isin(label, np.asarray(novel_classes, dtype=np.uint8))] = IGNORE_INDEX
    return out


def load_or_make_episode_list(
    path: str | os.PathLike,
    protocol: EvalProtocol,
    pools: Mapping[int, list[str]],
    counts: Mapping[str, Mapping[int, int]],
    num: int,
    max_shot: int,
    seed: int,
) -> list[Episode]:
    """The episode list saved at ``path``, or one drawn by ``protocol`` and written there atomically.

    The file stores a fingerprint of the data it was drawn from (the class pools, and for protocols
    that use them the novel classes present in each test image); a list drawn from other data is
    redrawn (with a warning). A hand-written list with ``"pool_fingerprint": null`` is always used as is.
    """
    fingerprint = protocol.fingerprint(pools, counts)
    data = read_json(path)
    if isinstance(data, dict) and data.get("version") == EPISODE_LIST_VERSION:
        if data.get("pool_fingerprint") in (None, fingerprint):
            return [(str(q), int(c), [str(s) for s in sup]) for q, c, sup in data["episodes"]]
        warnings.warn(f"episode list {path} was drawn from different data; redrawing it", stacklevel=2)
    episodes = protocol.draw(pools, counts, num, max_shot, seed)
    record = {
        "version": EPISODE_LIST_VERSION,
        "seed": seed,
        "max_shot": max_shot,
        "pool_fingerprint": fingerprint,
        "episodes": [[q, c, s] for q, c, s in episodes],
    }
    if protocol.draws != "spec":  # lists drawn by SPEC's rule keep their original layout
        record["draws"] = protocol.draws
    atomic_write_json(path, record)
    return episodes


class LabelValues(NamedTuple):
    """Label values of an episode's class in its query and supports, and of the novel classes in the query."""

    query: int
    supports: list[int]
    novel: list[int]


def label_values(
    source: SegmentationSource, query: str, support_ids: Sequence[str], class_id: int, novel: Sequence[int]
) -> LabelValues | None:
    """The :class:`LabelValues` of an episode on a source with image-local labels; None for global ones."""
    mapping = source.label_classes(query)
    if mapping is None:
        return None
    novel_set = set(novel)
    return LabelValues(
        source.class_value(query, class_id),
        [source.class_value(s, class_id) for s in support_ids],
        sorted(v for v, c in mapping.items() if c in novel_set),
    )


def episode_sample(
    q_img: np.ndarray,
    q_lab: np.ndarray,
    supports: Sequence[tuple[np.ndarray, np.ndarray]],
    class_id: int,
    novel_classes: Sequence[int],
    valid_size: Sequence[int],
    label_orig: np.ndarray,
    query_id: str,
    support_ids: Sequence[str],
    values: LabelValues | None = None,
) -> dict:
    """One episode as the dict ``collate_episodes`` expects (the EpisodeBatch fields, unbatched).

    Images are ``[H, W, 3]`` uint8 and labels ``[H, W]`` uint8 after the transform; ``label_orig`` is
    the semantic label used for scoring. ``values`` gives the label values of the class (and of the
    novel classes) when labels are image-local; None = the values are the global class ids.
    """
    if values is None:
        values = LabelValues(class_id, [class_id] * len(supports), list(novel_classes))
    return {
        "query_image": normalize_image(q_img),
        "query_mask": torch.from_numpy(binary_label(q_lab, values.query)),
        "support_images": torch.stack([normalize_image(img) for img, _ in supports]),
        "support_masks": torch.stack(
            [
                torch.from_numpy(binary_label(lab, v))
                for (_, lab), v in zip(supports, values.supports, strict=True)
            ]
        ),
        "class_id": class_id,
        "query_semantic": torch.from_numpy(semantic_label(q_lab, values.novel)),
        "query_valid_size": torch.tensor(valid_size),
        "query_label_orig": torch.from_numpy(binary_label(label_orig, values.query)),
        "query_id": query_id,
        "support_ids": list(support_ids),
    }


TrainPosition = Callable[[], tuple[int, int, int]]
"""Returns ``(batches done, rank, world size)`` of the running fit; read when an epoch starts."""


class TrainStepSampler(DistributedSampler):
    """Keys of the training episodes of this process: a function of (batch number, rank) only.

    Batch ``t`` of rank ``r`` among ``W`` processes holds the global episode keys
    ``(t * W + r) * b ... (t * W + r) * b + b - 1`` (``b`` = per-process batch), so

    * every process draws different episodes, and every batch new ones;
    * the episodes of optimisation step ``s`` over all processes are the keys
      ``[s * G, (s + 1) * G)`` of the global batch ``G = b * W * accumulation``, whatever ``W``;
    * the position comes from the Trainer (``position()`` when an epoch starts, after a checkpoint
      is restored), so a resumed fit continues exactly where the interrupted one stopped.

    A ``DistributedSampler`` only in type, so that Lightning keeps it under DDP instead of wrapping it
    in its own (which would split each batch again and replay epochs).

    Args:
        batch_size: keys per batch of this process.
        batches: batches per epoch (an epoch is only Lightning's bookkeeping here).
        position: ``() -> (batches done, rank, world size)``.
    """

    def __init__(self, batch_size: int, batches: int, position: TrainPosition) -> None:
        self.batch_size = batch_size
        self.batches = batches
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Nothing: the position follows the Trainer's step count, not the epoch."""

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start, rank, world = self.position()
        for t in range(start, start + self.batches):
            first = (t * world + rank) * self.batch_size
            yield from range(first, first + self.batch_size)


class TrainLoader(DataLoader):
    """The training DataLoader; stateful for Lightning because its position is the Trainer's step.

    Lightning warns that a fit resumed mid-epoch may replay data unless the loader can be resumed.
    :class:`TrainStepSampler` derives every batch from the restored step count, so there is no
    iterator state to save.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore (see the class docstring)."""


class TrainEpisodeDataset(Dataset):
    """Base-class training episodes (SPEC §5), one per integer key; keys are unbounded.

    Key ``k`` is episode ``i = k mod Q`` of pass ``p = k div Q`` over the ``Q`` query images (the images
    in some base class pool): its query is the ``i``-th image of a per-pass permutation, and every
    random choice comes from ``numpy.random.default_rng([seed, p, i])``, so an episode is the same in
    any worker, process or resumed run. After augmentation the class is drawn uniformly among base
    classes present in the crop; ``shot`` distinct supports of that class (never the query) are
    re-augmented until they keep ``support_min_pixels`` of it.
    """

    def __init__(
        self,
        source: SegmentationSource,
        pools: dict[int, list[str]],
        novel_classes: Sequence[int],
        shot: int,
        augment: TrainAugment,
        support_min_pixels: int,
        seed: int,
        length: int | None = None,
    ) -> None:
        self.source = source
        self.pools = pools
        self.base_classes = sorted(pools)
        self.novel_classes = list(novel_classes)
        self.shot = shot
        self.augment = augment
        self.support_min_pixels = support_min_pixels
        self.seed = seed
        self.queries = sorted({i for ids in pools.values() for i in ids})
        if not self.queries:
            raise DatasetError(f"no training image holds a base class {self.base_classes} with enough pixels")
        self.length = length or len(self.queries)
        self._base_set = set(self.base_classes)
        self._base_lut = np.zeros(256, dtype=bool)  # label value -> base class, for global-id labels
        self._base_lut[[c for c in self.base_classes if c < 256]] = True
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Episodes per epoch (``train_episodes``); keys beyond it are valid too."""
        return self.length

    def _query(self, p: int, index: int) -> str:
        if self._perm is None or self._perm[0] != p:
            perm = np.random.default_rng([self.seed, p, 2**31 - 1]).permutation(len(self.queries))
            self._perm = (p, perm)
        return self.queries[int(self._perm[1][index])]

    def __getitem__(self, key: int) -> dict:
        p, index = divmod(int(key), len(self.queries))
        rng = np.random.default_rng([self.seed, p, index])
        q = self._query(p, index)
        image, label = self.source.load(q)
        mapping = self.source.label_classes(q)
        lut = self._base_lut
        if mapping is not None:  # image-local labels: which of this image's values are base classes
            lut = np.zeros(256, dtype=bool)
            lut[[v for v, g in mapping.items() if g in self._base_set]] = True
        q_img, q_lab = self.augment(image, label, rng, accept=lambda lab: bool(lut[lab].any()))
        present = [int(c) for c in np.flatnonzero(np.bincount(q_lab.ravel(), minlength=256)) if lut[c]]
        if mapping is not None:
            present = [mapping[v] for v in present]
        if not present:  # only after the fallback on a degenerate image: use a class the pools promise
            present = [c for c in self.base_classes if q in self.pools[c]]
        c = present[int(rng.integers(len(present)))]

        candidates = [i for i in self.pools[c] if i != q]
        picks = rng.choice(len(candidates), size=self.shot, replace=False)
        support_ids = [candidates[int(j)] for j in picks]
        need = self.support_min_pixels
        supports = []
        for sid in support_ids:
            s_image, s_label = self.source.load(sid, c)
            v = self.source.class_value(sid, c)
            supports.append(
                self.augment(
                    s_image, s_label, rng, accept=lambda lab, v=v: int(np.count_nonzero(lab == v)) >= need
                )
            )
        values = label_values(self.source, q, support_ids, c, self.novel_classes)
        return episode_sample(
            q_img, q_lab, supports, c, self.novel_classes, q_lab.shape, q_lab, q, support_ids, values
        )


class ListEpisodeDataset(Dataset):
    """Fixed episodes (test or validation list) with deterministic test-time resizing.

    ``query_label_orig`` is the binary label at the original image size, or under a square protocol
    (``transform.square``) the resized label, scored at that size.
    """

    def __init__(
        self,
        source: SegmentationSource,
        episodes: list[Episode],
        shot: int,
        novel_classes: Sequence[int],
        transform: TestTransform,
    ) -> None:
        for q, c, sup in episodes:
            if len(sup) < shot:
                raise DatasetError(
                    f"episode ({q}, class {c}) lists {len(sup)} supports, fewer than shot={shot}"
                )
        self.source = source
        self.episodes = episodes
        self.shot = shot
        self.novel_classes = list(novel_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict:
        q, c, support_ids = self.episodes[int(index)]
        support_ids = support_ids[: self.shot]
        image, label = self.source.load(q, c)
        q_img, q_lab, valid = self.transform(image, label)
        orig = q_lab if self.transform.square else label
        supports = [self.transform(*self.source.load(sid, c))[:2] for sid in support_ids]
        values = label_values(self.source, q, support_ids, c, self.novel_classes)
        return episode_sample(
            q_img, q_lab, supports, c, self.novel_classes, valid, orig, q, support_ids, values
        )


def episode_list_path(
    directory: str | os.PathLike,
    name: str,
    fold: int,
    split: str,
    num: int,
    seed: int,
    max_shot: int,
    protocol: EvalProtocol,
) -> Path:
    """Where the ``split`` ("test" / "val") list of ``name``/``fold`` drawn by ``protocol``'s rule lives."""
    rule = "" if protocol.draws == "spec" else f"_{protocol.draws}"
    return Path(directory) / f"{name}_fold{fold}_{split}{rule}_n{num}_seed{seed}_maxshot{max_shot}.json"
