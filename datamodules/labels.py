"""Episode labels from dataset labels: the binary mask of the episode class, the stage-1 semantic target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fewshot_seg.episode import IGNORE_INDEX

from .source import SegmentationSource


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
