"""Stage-1 targets as one padded tensor, built without a device sync.

The POS criterion needs every query's binary masks (one per label value, background 0 included, 255
excluded) and, on the host, how many there are: the number of matched pairs fixes the shapes of the random
draws and of the Hungarian problems. ``torch.unique`` on the device would give both at the price of a host
sync per image; here the values are read on the host from the uint8 labels while the batch is collated
(``fewshot_seg.episode.collate_episodes``, in the loader workers) and the masks are one comparison on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fewshot_seg.episode import IGNORE_INDEX, host_to_device


def label_values(semantic: Tensor) -> list[tuple[int, ...]]:
    """Sorted distinct values (255 excluded) of every ``[B, H, W]`` host label map, as Python ints."""
    if semantic.device.type != "cpu":
        raise ValueError(f"label_values reads host labels; got a tensor on {semantic.device}")
    flat = semantic.reshape(semantic.shape[0], -1)
    if flat.dtype == torch.uint8:
        # bincount of value + 256 * image: all images in one pass over the bytes.
        offsets = torch.arange(flat.shape[0], dtype=torch.int64)[:, None] * 256
        present = (flat.long() + offsets).flatten().bincount(minlength=256 * flat.shape[0]).view(-1, 256) > 0
        rows = [torch.nonzero(p)[:, 0].tolist() for p in present]
    else:
        rows = [torch.unique(f).tolist() for f in flat]
    return [tuple(int(v) for v in row if v != IGNORE_INDEX) for row in rows]


@dataclass
class PaddedTargets:
    """B images' target masks in one tensor.

    Attributes:
        masks: ``[B, M, H, W]`` bool (or float), M = the largest count; rows ``counts[b]:`` of image b are
            padding (zeros) and never matched.
        counts: targets per image, on the host.
    """

    masks: Tensor
    counts: list[int]

    @classmethod
    def from_semantic(cls, semantic: Tensor, values: Sequence[Sequence[int]]) -> PaddedTargets:
        """Masks ``semantic[b] == values[b][m]`` from ``[B, H, W]`` labels and their host-known values.

        One comparison on the device: the values go there as a ``[B, M]`` table padded with -1 (no label).
        """
        counts = [len(v) for v in values]
        width = max(counts, default=0)
        table = np.full((len(values), width), -1, dtype=np.int64)  # filled on the host: no operations
        for b, v in enumerate(values):
            table[b, : len(v)] = v
        table = host_to_device(torch.from_numpy(table), semantic.device)
        return cls(semantic[:, None] == table[:, :, None, None], counts)

    @classmethod
    def from_list(cls, targets: Sequence[dict[str, Tensor]]) -> PaddedTargets:
        """From B dicts ``{"masks": [M_b, H, W]}``
        (:func:`fewshot_seg.models.criterion.semantic_to_targets`)."""
        masks = [t["masks"] for t in targets]
        counts = [int(m.shape[0]) for m in masks]
        width = max(counts, default=0)
        h, w = masks[0].shape[-2:]
        padded = masks[0].new_zeros((len(masks), width, h, w))
        for b, m in enumerate(masks):
            padded[b, : counts[b]] = m
        return cls(padded, counts)

    def to(self, device: torch.device) -> PaddedTargets:
        return PaddedTargets(self.masks.to(device), self.counts)
