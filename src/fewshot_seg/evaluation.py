"""The evaluation protocol's last step: from a foreground map at the model input to a binary mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

THRESHOLD = 0.5
"""Foreground where the merged map (or the chosen proposal's probability) exceeds this (SPEC §2 step 8)."""


def resize_to_labels(
    foreground: Tensor, valid_size: Tensor, label_sizes: Sequence[tuple[int, int]]
) -> list[Tensor]:
    """:func:`to_label_size` before the threshold: B float maps ``[h_i, w_i]``."""
    maps = []
    for fg, (h, w), size in zip(foreground.float(), valid_size.tolist(), label_sizes):
        crop = fg[:h, :w]
        if tuple(crop.shape) != tuple(size):
            crop = F.interpolate(crop[None, None], size=tuple(size), mode="bilinear", align_corners=True)[
                0, 0
            ]
        maps.append(crop)
    return maps


def to_label_size(
    foreground: Tensor,
    valid_size: Tensor,
    label_sizes: Sequence[tuple[int, int]],
    threshold: float = THRESHOLD,
) -> list[Tensor]:
    """Crop to the real content, resize to the scoring label, threshold (SPEC §5/§6).

    Each map is cropped to the query's real content (``valid_size``, top-left aligned) *before* the
    resize, so padding never leaks in; it is then resized bilinearly to its scoring label's size
    (align_corners=True, as the PFENet/HSNet evaluators) and thresholded. The scoring label is the
    original one or the resized one, as the evaluation protocol decides (``EpisodeBatch.query_label_orig``).

    Args:
        foreground: ``[B, H, W]`` foreground map at the model input size.
        valid_size: ``[B, 2]`` (h, w) of real content.
        label_sizes: B scoring label sizes (h_i, w_i).
        threshold: foreground where the map exceeds it.

    Returns:
        B bool tensors ``[h_i, w_i]``.
    """
    return [m > threshold for m in resize_to_labels(foreground, valid_size, label_sizes)]
