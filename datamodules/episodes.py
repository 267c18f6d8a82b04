"""The episode datasets: base-class training episodes by key, and fixed test / validation episodes.

Samples are dicts with the ``EpisodeBatch`` fields (no batch dimension), stacked by
``fewshot_seg.episode.collate_episodes``. Images and masks travel as uint8 (a quarter of float32's bytes
between worker processes and to the device); the stage modules normalise the images and widen the
labels to int64 on the device (``EpisodeBatch.normalized``). Labels: ``labels.py``; saved lists:
``episode_lists.py``; which keys a process draws: ``sampling.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fewshot_seg.episode import image_tensor

from .errors import DatasetError
from .labels import LabelValues, binary_label, label_values, semantic_label
from .protocols import Episode
from .source import SegmentationSource
from .transforms import TestTransform, TrainAugment


def episode_sample(
    *,
    query: np.ndarray,
    query_label: np.ndarray,
    supports: Sequence[tuple[np.ndarray, np.ndarray]],
    class_id: int,
    novel_classes: Sequence[int],
    query_id: str,
    support_ids: Sequence[str],
    valid_size: Sequence[int] | None = None,
    scored_label: np.ndarray | None = None,
    values: LabelValues | None = None,
) -> dict:
    """One episode as the dict ``collate_episodes`` expects (the EpisodeBatch fields, unbatched).

    Args:
        query: ``[H, W, 3]`` uint8 query image after the transform.
        query_label: ``[H, W]`` uint8 its label after the transform.
        supports: K (image ``[H, W, 3]``, label ``[H, W]``) pairs after the transform.
        class_id: the episode class.
        novel_classes: the fold's novel classes (255 in the stage-1 semantic target).
        query_id, support_ids: image ids.
        valid_size: (h, w) of real content in the query; None = all of it (training crops).
        scored_label: the label the evaluation protocol scores; None = ``query_label`` (training).
        values: the label values of the class (and of the novel classes) when labels are image-local;
            None = the values are the global class ids.
    """
    if values is None:
        values = LabelValues(class_id, [class_id] * len(supports), list(novel_classes))
    scored = query_label if scored_label is None else scored_label
    return {
        "query_image": image_tensor(query),
        "query_mask": torch.from_numpy(binary_label(query_label, values.query)),
        # K = 0 (stage-1 training): empty [0, 3, H, W] / [0, H, W] stacks, collated to [B, 0, ...].
        "support_images": torch.stack([image_tensor(img) for img, _ in supports])
        if supports
        else torch.empty((0, 3, *query_label.shape), dtype=torch.uint8),
        "support_masks": torch.stack(
            [
                torch.from_numpy(binary_label(lab, v))
                for (_, lab), v in zip(supports, values.supports, strict=True)
            ]
        )
        if supports
        else torch.empty((0, *query_label.shape), dtype=torch.uint8),
        "class_id": class_id,
        "query_semantic": torch.from_numpy(semantic_label(query_label, values.novel)),
        "query_valid_size": torch.tensor(query_label.shape if valid_size is None else valid_size),
        "query_label_orig": torch.from_numpy(binary_label(scored, values.query)),
        "query_id": query_id,
        "support_ids": list(support_ids),
    }


def source_episode(
    source: SegmentationSource,
    query_id: str,
    class_id: int,
    support_ids: Sequence[str],
    novel_classes: Sequence[int],
    query: np.ndarray,
    query_label: np.ndarray,
    supports: Sequence[tuple[np.ndarray, np.ndarray]],
    valid_size: Sequence[int] | None = None,
    scored_label: np.ndarray | None = None,
) -> dict:
    """:func:`episode_sample` of a dataset episode, with the label values its ``source`` uses."""
    return episode_sample(
        query=query,
        query_label=query_label,
        supports=supports,
        class_id=class_id,
        novel_classes=novel_classes,
        query_id=query_id,
        support_ids=support_ids,
        valid_size=valid_size,
        scored_label=scored_label,
        values=label_values(source, query_id, support_ids, class_id, novel_classes),
    )


def _draw_except(pool: list[str], exclude: str, k: int, rng: np.random.Generator) -> list[str]:
    """k distinct ids of ``pool`` other than ``exclude``: the draw of ``rng.choice`` over the pool
    without ``exclude``, made by index arithmetic instead of copying a pool of up to ~45k ids (COCO)."""
    try:
        skip = pool.index(exclude)
    except ValueError:
        skip = len(pool)
    picks = rng.choice(len(pool) - (skip < len(pool)), size=k, replace=False)
    return [pool[int(j) + (int(j) >= skip)] for j in picks]


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

        supports, support_ids = [], []
        if self.shot:  # drawn after the query and class: those do not depend on the shot
            support_ids = _draw_except(self.pools[c], q, self.shot, rng)
        need = self.support_min_pixels
        for sid in support_ids:
            s_image, s_label = self.source.load(sid, c)
            v = self.source.class_value(sid, c)
            supports.append(
                self.augment(
                    s_image, s_label, rng, accept=lambda lab, v=v: int(np.count_nonzero(lab == v)) >= need
                )
            )
        return source_episode(self.source, q, c, support_ids, self.novel_classes, q_img, q_lab, supports)


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
        return source_episode(
            self.source, q, c, support_ids, self.novel_classes, q_img, q_lab, supports, valid, orig
        )
