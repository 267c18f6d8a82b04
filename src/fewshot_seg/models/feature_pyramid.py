"""ViTDet's simple feature pyramid: one stride-16 map of a plain ViT -> res2..res5 (strides 4..32).

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ECCV 2022), Fig. 2c: the
last block's map alone, no lateral connections; stride 4 by two 2x2 deconvolutions, 8 by one, 16 as
it is, 32 by a 2x2 max-pool; each level then a 1x1 and a 3x3 convolution, each followed by a channel
LayerNorm (the ViTDet code's "LN" norm). All of it is new, randomly initialised, and trained with the
POS even when the ViT is frozen.
"""

from __future__ import annotations

from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from torch import Tensor, nn

from fewshot_seg.models.backbone_base import LEVELS, STRIDES

PYRAMID_STRIDE = STRIDES["res4"]
"""The stride a ViT's token grid stands for in the pyramid (its one input map)."""


def LayerNorm2d(channels: int) -> nn.Module:
    """timm's LayerNorm over the channels of a ``[B, C, H, W]`` map (ViTDet / ConvNeXt's channel LN), with
    ``nn.LayerNorm``'s eps 1e-5 (timm's default is 1e-6) so that trained pyramids keep their outputs."""
    return _TimmLayerNorm2d(channels, eps=1e-5)


def _rescale(in_channels: int, stride: int) -> tuple[nn.Module, int]:
    """The resampling from stride 16 to ``stride`` and its output channels."""
    d = in_channels
    if stride == 4:
        half = nn.ConvTranspose2d(d, d // 2, kernel_size=2, stride=2)
        return nn.Sequential(
            half, LayerNorm2d(d // 2), nn.GELU(), nn.ConvTranspose2d(d // 2, d // 4, 2, 2)
        ), d // 4
    if stride == 8:
        return nn.ConvTranspose2d(d, d // 2, kernel_size=2, stride=2), d // 2
    if stride == 16:
        return nn.Identity(), d
    return nn.MaxPool2d(kernel_size=2, stride=2), d


class SimpleFeaturePyramid(nn.Module):
    """Strides 4, 8, 16, 32 from a single stride-16 map.

    Args:
        in_channels: channels D of the ViT map (its embedding width; divisible by 4).
        out_channels: channels of every output level (256 in ViTDet).

    Forward:
        x: ``[B, D, H/16, W/16]`` (H, W even multiples of 16: the map of a padded image).
        returns ``{"res2": [B, C, H/4, W/4], "res3": [B, C, H/8, W/8], "res4": [B, C, H/16, W/16],
        "res5": [B, C, H/32, W/32]}`` with C = ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"the pyramid halves the ViT width twice: {in_channels} is not divisible by 4")
        self.rescale = nn.ModuleDict()
        self.output = nn.ModuleDict()
        self.out_strides = dict(STRIDES)
        for name in LEVELS:
            rescale, c = _rescale(in_channels, self.out_strides[name])
            self.rescale[name] = rescale
            # No conv bias: a LayerNorm follows (ViTDet's use_bias = norm == "").
            self.output[name] = nn.Sequential(
                nn.Conv2d(c, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            )
        for m in self.output.modules():
            if isinstance(m, nn.Conv2d):  # detectron2's c2_msra_fill, as ViTDet
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.out_channels = {name: out_channels for name in LEVELS}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: self.output[name](self.rescale[name](x)) for name in LEVELS}
