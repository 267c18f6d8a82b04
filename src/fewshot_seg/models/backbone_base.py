"""The one backbone contract (detectron2's ``Backbone``): what every backbone gives the POS and Mask Matching.

A backbone maps normalised images ``[B, 3, H, W]`` of any size to ``{"res2": [B, C2, Hp/4, Wp/4], ...,
"res5": [B, C5, Hp/32, Wp/32]}`` of the image zero-padded bottom/right to a multiple of
``size_divisibility`` (Hp, Wp), and says what it returns: ``out_channels`` and ``out_strides`` per level
(detectron2's ``output_shape()``). ``ResNetBackbone`` and the timm backbones implement it; the stride
table, the padding multiple and the padding code live here only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = ("res2", "res3", "res4", "res5")
"""The levels every backbone returns, finest first."""

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
"""Stride of each level w.r.t. the padded image."""

SIZE_DIVISIBILITY = STRIDES["res5"]
"""Images are padded to a multiple of the coarsest stride, so every level divides them exactly."""

TIMM_PREFIX = "timm:"
"""Backbone names of timm models: ``timm:<model>`` (``models.timm_backbone``)."""


class ShapeSpec(NamedTuple):
    """One level's output: channels and stride (detectron2's ``ShapeSpec``)."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Base of every backbone: the contract above, and the padding all of them apply first.

    Subclasses set ``out_channels`` (and ``out_strides`` when theirs are read from the model) in
    ``__init__`` and call :meth:`pad` on the images before their trunk.
    """

    size_divisibility: int = SIZE_DIVISIBILITY

    def __init__(self) -> None:
        super().__init__()
        self.out_channels: dict[str, int] = {}
        self.out_strides: dict[str, int] = dict(STRIDES)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of each level."""
        return {name: ShapeSpec(self.out_channels[name], self.out_strides[name]) for name in LEVELS}

    def pad(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 3, Hp, Wp]``, zero-padded (the mean pixel once normalised) bottom/right
        to multiples of :attr:`size_divisibility`; unchanged when already a multiple."""
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % self.size_divisibility, (-w) % self.size_divisibility
        return F.pad(images, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else images
