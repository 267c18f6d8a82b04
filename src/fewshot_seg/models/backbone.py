"""Backbones returning res2..res5 (strides 4..32, no dilation): torchvision ResNets here, timm models
(``timm:<model>``) in ``models.timm_backbone``; :func:`build_backbone` takes either name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from fewshot_seg.models.backbone_base import TIMM_PREFIX, Backbone
from fewshot_seg.models.frozen_bn import CachedFrozenBatchNorm2d


class BackboneError(ValueError):
    """A backbone that cannot be built from its configuration; ``option`` names the BackboneConfig field
    at fault (``name``, ``weights``), so that a command line can name its argument."""

    option = "name"

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        if option is not None:
            self.option = option


_ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights, 1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights, 1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights, 4),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights, 4),
}


class ResNetBackbone(Backbone):
    """ResNet trunk with torchvision parameter names (``conv1``, ``bn1``, ``layer1..4``).

    Forward: normalised images ``[B, 3, H, W]`` are zero-padded bottom/right to a multiple of 32; returns
    ``{"res2": [B, C2, Hp/4, Wp/4], "res3": ... /8, "res4": ... /16, "res5": [B, C5, Hp/32, Wp/32]}`` of the
    padded image (Hp, Wp = padded size).
    """

    def __init__(self, resnet: torchvision.models.ResNet, name: str) -> None:
        super().__init__()
        self.name = name
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        expansion = _ARCHS[name][2]
        self.out_channels = {
            "res2": 64 * expansion,
            "res3": 128 * expansion,
            "res4": 256 * expansion,
            "res5": 512 * expansion,
        }

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.pad(images)))))
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's weights API caches the IMAGENET1K_V1 file of ``name``."""
    url = _ARCHS[name][1].IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    weights = _ARCHS[name][1].IMAGENET1K_V1
    path = imagenet_weights_path(name)
    try:
        # Uses the torch hub cache when the file is there, otherwise tries to download it.
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        raise FileNotFoundError(
            f"ImageNet weights for {name} are not available and could not be downloaded ({exc}). "
            f"Place the file {path.name} (from {weights.url}) at {path} "
            "(the torch hub checkpoints directory; set TORCH_HOME to move it), "
            "or pass weights=<local path>."
        ) from exc


def frozen_parts(backbone: nn.Module, prefix: str = "backbone") -> tuple[str, ...]:
    """The sub-module paths that freezing the backbone ``prefix`` freezes: all of it, or, for a backbone
    with new layers (a ViT's feature pyramid, its ``new_modules``), every other child."""
    new = getattr(backbone, "new_modules", ())
    if not new:
        return (prefix,)
    return tuple(f"{prefix}.{n}" for n, _ in backbone.named_children() if n not in new)


def backbone_lr_mult(backbone: nn.Module, lr_mult: float, prefix: str = "backbone") -> dict[str, float]:
    """Learning-rate multipliers by name prefix: ``lr_mult`` for the backbone, 1 for its new layers."""
    return {prefix: lr_mult, **{f"{prefix}.{n}": 1.0 for n in getattr(backbone, "new_modules", ())}}


def build_backbone(
    name: str = "resnet50",
    weights: str | None = "imagenet",
    frozen_bn: bool = True,
    pyramid_channels: int = 256,
) -> nn.Module:
    """Build a backbone returning res2..res5 (``out_channels`` / ``out_strides`` say their shapes).

    Args:
        name: resnet18 / resnet34 / resnet50 / resnet101 (torchvision), or ``timm:<model>`` (see
            :func:`~fewshot_seg.models.timm_backbone.build_timm_backbone`).
        weights: ``"imagenet"`` (torchvision IMAGENET1K_V1 via its weights API and cache; timm's
            pretrained weights for a timm model), a local file (torchvision state dict, or a
            detectron2-style dict with ``backbone.*`` / ``stem.*`` names, possibly wrapped in
            ``{"model": ...}``; timm's names for a timm model), or None (random init).
        frozen_bn: use ``FrozenBatchNorm2d`` (statistics and affine as buffers, eps 1e-5) instead of
            BatchNorm2d.
        pyramid_channels: channels of the simple feature pyramid of a plain timm ViT (ignored otherwise).
    """
    if name.startswith(TIMM_PREFIX):
        from fewshot_seg.models.timm_backbone import build_timm_backbone

        return build_timm_backbone(name, weights, frozen_bn=frozen_bn, pyramid_channels=pyramid_channels)
    if name not in _ARCHS:
        raise BackboneError(
            f"unknown backbone {name!r}; choose from {sorted(_ARCHS)} or a timm model as 'timm:<name>'"
        )
    ctor = _ARCHS[name][0]
    norm_layer = CachedFrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d  # torchvision's, affine cached
    backbone = ResNetBackbone(ctor(weights=None, norm_layer=norm_layer), name)
    if weights is None:
        return backbone
    if weights == "imagenet":
        state = _imagenet_state_dict(name)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        backbone.load_state_dict(state, strict=True)
        return backbone
    # convert imports us
    from fewshot_seg.models.convert import CheckpointMismatchError, load_reference_module, read_state_dict

    if not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights file {weights!r} does not exist")
    state = read_state_dict(weights)
    if any(k.startswith("backbone.") for k in state):  # a whole detectron2-style model: keep its trunk
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        load_reference_module(backbone, state, "backbone")
    except CheckpointMismatchError as err:  # the same error, saying which file
        raise CheckpointMismatchError(
            f"backbone weights file {weights!r} does not fit {name}: {err}", err.report
        ) from None
    return backbone
