"""Episode sampling shared by every DataModule: training episodes, saved test/val episode lists.

Samples are dicts with the ``EpisodeBatch`` fields (no batch dimension), stacked by
``fewshot_seg.episode.collate_episodes``. Masks travel as uint8 (cheaper between worker processes);
the collate function turns them into int64.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fewshot_seg.episode import IGNORE_INDEX

from .cache import atomic_write_json, read_json
from .errors import DatasetError
from .source import SegmentationSource
from .transforms import TestTransform, TrainAugment, normalize_image

Episode = tuple[str, int, list[str]]
"""(query id, class id, support ids) of a listed episode."""

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


def make_episode_list(pools: dict[int, list[str]], num: int, max_shot: int, seed: int) -> list[Episode]:
    """``num`` episodes drawn from ``pools`` (class -> image ids) with one seeded generator.

    Query uniform over the union of the pools; class uniform among the pool classes the query
    belongs to; ``min(max_shot, pool size - 1)`` distinct supports of that class, excluding the query.
    The K-shot episode uses the first K supports, so the 1-shot list is the 5-shot list's first support.
    """
    membership: dict[str, list[int]] = {}
    for c, ids in sorted(pools.items()):
        for i in ids:
            membership.setdefault(i, []).append(c)
    queries = sorted(membership)
    if not queries:
        raise DatasetError(f"no image qualifies for any of the classes {sorted(pools)}: cannot draw episodes")
    rng = np.random.default_rng(seed)
    episodes: list[Episode] = []
    for _ in range(num):
        q = queries[int(rng.integers(len(queries)))]
        c = membership[q][int(rng.integers(len(membership[q])))]
        candidates = [i for i in pools[c] if i != q]
        k = min(max_shot, len(candidates))
        picks = rng.choice(len(candidates), size=k, replace=False)
        episodes.append((q, c, [candidates[int(j)] for j in picks]))
    return episodes


def load_or_make_episode_list(
    path: str | os.PathLike,
    pools: dict[int, list[str]],
    num: int,
    max_shot: int,
    seed: int,
    fingerprint: str,
) -> list[Episode]:
    """The episode list saved at ``path``, or a new one written there atomically.

    The file stores the fingerprint of the class pools it was drawn from; a list drawn from other
    data is redrawn (with a warning). A hand-written list with ``"pool_fingerprint": null`` is
    always used as is.
    """
    data = read_json(path)
    if isinstance(data, dict) and data.get("version") == EPISODE_LIST_VERSION:
        if data.get("pool_fingerprint") in (None, fingerprint):
            return [(str(q), int(c), [str(s) for s in sup]) for q, c, sup in data["episodes"]]
        warnings.warn(f"episode list {path} was drawn from different data; redrawing it", stacklevel=2)
    episodes = make_episode_list(pools, num, max_shot, seed)
    atomic_write_json(
        path,
        {
            "version": EPISODE_LIST_VERSION,
            "seed": seed,
            "max_shot": max_shot,
            "pool_fingerprint": fingerprint,
            "episodes": [[q, c, s] for q, c, s in episodes],
        },
    )
    return episodes


def pools_fingerprint(pools: dict[int, list[str]]) -> str:
    import hashlib
    import json

    return hashlib.sha1(json.dumps({str(c): v for c, v in sorted(pools.items())}).encode()).hexdigest()


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
) -> dict:
    """One episode as the dict ``collate_episodes`` expects (the EpisodeBatch fields, unbatched).

    Images are ``[H, W, 3]`` uint8 and labels ``[H, W]`` uint8 after the transform; ``label_orig`` is
    the semantic label used for scoring.
    """
    return {
        "query_image": normalize_image(q_img),
        "query_mask": torch.from_numpy(binary_label(q_lab, class_id)),
        "support_images": torch.stack([normalize_image(img) for img, _ in supports]),
        "support_masks": torch.stack([torch.from_numpy(binary_label(lab, class_id)) for _, lab in supports]),
        "class_id": class_id,
        "query_semantic": torch.from_numpy(semantic_label(q_lab, novel_classes)),
        "query_valid_size": torch.tensor(valid_size),
        "query_label_orig": torch.from_numpy(binary_label(label_orig, class_id)),
        "query_id": query_id,
        "support_ids": list(support_ids),
    }


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for ``range(length)``; Lightning calls :meth:`set_epoch`.

    The epoch travels with the index so that a worker derives the episode from
    ``(seed, epoch, index)`` alone, making episodes independent of ``num_workers``.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in range(self.length)])


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return 0, int(key)


class TrainEpisodeDataset(Dataset):
    """Base-class training episodes (SPEC §5), one per ``(epoch, index)`` key.

    The query is the ``index``-th image of a per-epoch permutation of the images in some base
    class pool; after augmentation the class is drawn uniformly among base classes present in
    the crop; ``shot`` distinct supports of that class (never the query) are re-augmented until
    they keep ``support_min_pixels`` of it.
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
        self._base_lut = np.zeros(256, dtype=bool)
        self._base_lut[self.base_classes] = True
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def _query(self, epoch: int, index: int) -> str:
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, 2**31 - 1]).permutation(len(self.queries))
            self._perm = (epoch, perm)
        return self.queries[int(self._perm[1][index % len(self.queries)])]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = _split_key(key)
        rng = np.random.default_rng([self.seed, epoch, index])
        q = self._query(epoch, index)
        image, label = self.source.load(q)
        lut = self._base_lut
        q_img, q_lab = self.augment(image, label, rng, accept=lambda lab: bool(lut[lab].any()))
        present = [int(c) for c in np.unique(q_lab) if lut[c]]
        if not present:  # only after the fallback on a degenerate image: use a class the pools promise
            present = [c for c in self.base_classes if q in self.pools[c]]
        c = present[int(rng.integers(len(present)))]

        candidates = [i for i in self.pools[c] if i != q]
        picks = rng.choice(len(candidates), size=self.shot, replace=False)
        support_ids = [candidates[int(j)] for j in picks]
        need = self.support_min_pixels
        supports = []
        for sid in support_ids:
            s_image, s_label = self.source.load(sid)
            supports.append(
                self.augment(
                    s_image, s_label, rng, accept=lambda lab, c=c: int(np.count_nonzero(lab == c)) >= need
                )
            )
        return episode_sample(
            q_img, q_lab, supports, c, self.novel_classes, q_lab.shape, q_lab, q, support_ids
        )


class ListEpisodeDataset(Dataset):
    """Fixed episodes (test or validation list) with deterministic test-time resizing.

    ``query_label_orig`` is the binary label at the original image size under protocol
    ``"original"``, and the resized label under ``"square480"`` (scored at that size).
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

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        q, c, support_ids = self.episodes[_split_key(index)[1]]
        support_ids = support_ids[: self.shot]
        image, label = self.source.load(q)
        q_img, q_lab, valid = self.transform(image, label)
        orig = label if self.transform.protocol == "original" else q_lab
        supports = [self.transform(*self.source.load(sid))[:2] for sid in support_ids]
        return episode_sample(q_img, q_lab, supports, c, self.novel_classes, valid, orig, q, support_ids)


def episode_list_path(
    directory: str | os.PathLike, name: str, fold: int, split: str, num: int, seed: int, max_shot: int
) -> Path:
    """Where the ``split`` ("test" / "val") list of ``name``/``fold`` lives."""
    return Path(directory) / f"{name}_fold{fold}_{split}_n{num}_seed{seed}_maxshot{max_shot}.json"
