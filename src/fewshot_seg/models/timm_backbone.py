"""timm backbones returning res2..res5, as the torchvision ResNet trunk does.

* Hierarchical models (ConvNeXt, Swin, timm's ResNets, EfficientNet, ...): ``features_only=True`` with
  the ``out_indices`` whose reductions are 4, 8, 16 and 32 (the deepest level of each); channels are
  read from ``feature_info``. A model without one of these four strides is refused by name.
* Plain ViTs (a single reduction, the patch size: DINOv2 ``vit_*_patch14_dinov2``, ``vit_*_patch16_*``,
  EVA-02): the last block's map (after the final norm) through ViTDet's simple feature pyramid
  (``models.feature_pyramid``), whose layers are new parameters, trained even when the ViT is frozen.

Both pad the image bottom/right with zeros to a multiple of 32, as the ResNet trunk, and return the
same sizes: ``res_s`` is ``[B, C_s, Hp/s, Wp/s]``. A ViT's token grid is made exactly ``Hp/16 x Wp/16``:
the padded image is resized by ``patch/16`` (7/8 for patch 14: a 480 input is seen at 420 px, 30 x 30
tokens; unchanged for patch 16), so that token (i, j) covers the 16 x 16 input pixels of res4's cell
(i, j) and no feature is resampled afterwards.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.backbone import BackboneError
from fewshot_seg.models.backbone_base import LEVELS, STRIDES, TIMM_PREFIX, Backbone
from fewshot_seg.models.feature_pyramid import PYRAMID_STRIDE, SimpleFeaturePyramid

# `backbone.weights` values meaning "timm's pretrained weights of the model (its default tag, or the tag
# given in the name)"; "imagenet" is the project's default value, kept meaningful for timm names.
PRETRAINED = ("pretrained", "imagenet", "timm")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class BackboneWeightsError(BackboneError):
    """A backbone weights file that cannot be read or does not fit the model; the message names it."""

    option = "weights"


class TimmFeaturesBackbone(Backbone):
    """A hierarchical timm model (``features_only``) as res2..res5.

    Forward: normalised images ``[B, 3, H, W]``, zero-padded bottom/right to a multiple of 32 (Hp, Wp);
    returns ``{"res2": [B, C2, Hp/4, Wp/4], ..., "res5": [B, C5, Hp/32, Wp/32]}``, C from ``feature_info``.
    """

    def __init__(self, trunk: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk
        info = trunk.feature_info
        self.out_channels = dict(zip(LEVELS, info.channels(), strict=True))
        self.out_strides = dict(zip(LEVELS, info.reduction(), strict=True))
        # Swin & co. return NHWC maps from their feature wrapper.
        self.channels_last = str(getattr(trunk, "output_fmt", "NCHW")).upper().endswith("NHWC")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        images = self.pad(images)
        hp, wp = images.shape[-2:]
        out = {}
        for name, f in zip(LEVELS, self.trunk(images), strict=True):
            if self.channels_last:
                f = f.permute(0, 3, 1, 2)
            s = self.out_strides[name]
            if f.shape[-2:] != (hp // s, wp // s):
                raise RuntimeError(
                    f"timm model {self.name!r} gave {name} {tuple(f.shape[-2:])} for a {hp}x{wp} input, "
                    f"not {(hp // s, wp // s)}: its stride-{s} level does not divide the image exactly"
                )
            out[name] = f
        return out


class TimmViTBackbone(Backbone):
    """A plain timm ViT + the simple feature pyramid as res2..res5.

    Forward: normalised images ``[B, 3, H, W]`` are zero-padded bottom/right to a multiple of 32 (Hp, Wp),
    resized to ``(Hp/16 * p, Wp/16 * p)`` for patch size p (no resize for p = 16), run through the ViT
    (``Hp/16 x Wp/16`` tokens; its position embedding interpolated to that grid) and the pyramid;
    returns ``{"res2": [B, C, Hp/4, Wp/4], ..., "res5": [B, C, Hp/32, Wp/32]}``, C = ``pyramid_channels``.

    ``trunk`` holds the ViT (the pretrained part, frozen in the paper setting), ``pyramid`` the new layers.
    """

    new_modules: tuple[str, ...] = ("pyramid",)
    """Sub-modules that are not part of the pretrained model: never frozen in stage 1, learning rate x1."""

    def __init__(self, trunk: nn.Module, name: str, pyramid_channels: int = 256) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk
        patch = trunk.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.pyramid = SimpleFeaturePyramid(trunk.feature_info[-1]["num_chs"], pyramid_channels)
        self.out_channels = dict(self.pyramid.out_channels)

    def tokens_input(self, images: Tensor) -> Tensor:
        """The padded image at the size whose token grid is ``Hp/16 x Wp/16``."""
        images = self.pad(images)
        hp, wp = images.shape[-2:]
        size = (hp // PYRAMID_STRIDE * self.patch_size[0], wp // PYRAMID_STRIDE * self.patch_size[1])
        if size == (hp, wp):
            return images
        # Antialiased: for patch 14 this is a 7/8 downscale.
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.trunk.forward_intermediates(
            self.tokens_input(images), indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]  # [B, D, Hp/16, Wp/16]
        return self.pyramid(x)


# ---------------------------------------------------------------------------------------------- building
def timm_model_name(name: str) -> str:
    """``"timm:convnext_base"`` -> ``"convnext_base"`` (a pretrained tag may follow: ``model.tag``)."""
    return name.removeprefix(TIMM_PREFIX)


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a declared dependency
        raise ImportError("timm backbones need the timm package (`make install` installs it)") from err
    return timm


def _probe(timm: Any, arch: str) -> nn.Module:
    """The model without weights (on the meta device when it allows it): its feature_info, its class."""
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False)
    except Exception:
        return timm.create_model(arch, pretrained=False)


def _model_kwargs(probe: nn.Module) -> dict[str, Any]:
    """Constructor options for any input size: ``dynamic_img_size`` where the model takes it (ViT; Swin
    from timm 1.0.31), else ``strict_img_size=False`` (Swin in earlier timm: attention masks per input)."""
    params = inspect.signature(type(probe).__init__).parameters
    if "dynamic_img_size" in params:
        return {"dynamic_img_size": True}
    return {"strict_img_size": False} if "strict_img_size" in params else {}


def _is_plain(probe: nn.Module) -> bool:
    reductions = {f["reduction"] for f in probe.feature_info}
    return len(reductions) == 1 and hasattr(probe, "patch_embed") and hasattr(probe, "forward_intermediates")


def _out_indices(probe: nn.Module, arch: str) -> tuple[int, ...]:
    """The deepest feature level of each stride 4, 8, 16, 32; a ValueError when one is missing."""
    by_stride: dict[int, int] = {}
    for i, f in enumerate(probe.feature_info):
        by_stride[int(f["reduction"])] = i
    missing = [s for s in STRIDES.values() if s not in by_stride]
    if missing:
        have = [(int(f["reduction"]), int(f["num_chs"])) for f in probe.feature_info]
        raise ValueError(
            f"timm model {arch!r} has no feature level at stride(s) {missing} (its levels as (stride, "
            f"channels): {have}); MM-Former's pixel decoder needs res2..res5 at strides 4, 8, 16 and 32. "
            "Choose a hierarchical model with all four, or a plain ViT (it goes through the simple "
            "feature pyramid)."
        )
    return tuple(by_stride[s] for s in STRIDES.values())


def _is_path(weights: str) -> bool:
    return os.sep in weights or weights.lower().endswith(_WEIGHT_SUFFIXES) or Path(weights).exists()


def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A local weights file (``.safetensors``, else a PyTorch state dict read with ``weights_only=True``).

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped and a ``module.`` prefix dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        BackboneWeightsError: unreadable, or not a mapping of tensors; the message names the file.
    """
    name = f"backbone weights file {str(path)!r}"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(p)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise BackboneWeightsError(f"{name} is not a readable safetensors / PyTorch file: {first}") from None
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("state_dict", "model")):
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BackboneWeightsError(f"{name} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _summary(err: Exception, limit: int = 900) -> str:
    """torch's load_state_dict error (missing / unexpected keys, size mismatches) on one line."""
    lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines[1:] if len(lines) > 1 and "Error(s) in loading" in lines[0] else lines)
    return text if len(text) <= limit else text[:limit] + " ..."


def _create_from_file(timm: Any, arch: str, path: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """timm's own loading (its checkpoint filter, then a strict load) of a local file, offline."""
    state = read_weights_file(path)
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    # The ImageNet classifier is not part of a backbone: a file may hold it or not.
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    overlay = {"state_dict": state, "num_classes": 0}
    try:
        model = timm.create_model(
            arch,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            pretrained_strict=True,
            num_classes=0,
            **kwargs,
        )
    except RuntimeError as err:
        raise BackboneWeightsError(
            f"backbone weights file {path!r} does not fit timm model {arch!r}: {_summary(err)}. "
            "Expected timm's parameter names, as in `timm.create_model(name).state_dict()` or the "
            "model.safetensors of the model's Hugging Face hub page."
        ) from None
    model.pretrained_cfg.pop("state_dict", None)  # no second reference to the weights
    return model


def _create_pretrained(timm: Any, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        cfg = timm.models.get_pretrained_cfg(arch)
        hub = f" (hub: {cfg.hf_hub_id})" if cfg is not None and cfg.hf_hub_id else ""
        raise FileNotFoundError(
            f"timm pretrained weights of {arch!r}{hub} are not available offline and could not be downloaded "
            f"({type(err).__name__}: {first[:300]}). With a network timm downloads them once into the "
            "Hugging Face cache (HF_HOME); offline, pass backbone.weights=<a local .safetensors / .pth "
            "file of the timm model>."
        ) from None


def build_timm_backbone(
    name: str, weights: str | None = None, frozen_bn: bool = True, pyramid_channels: int = 256
) -> nn.Module:
    """A timm model as res2..res5 (:class:`TimmFeaturesBackbone` or :class:`TimmViTBackbone`).

    Args:
        name: ``timm:<model>`` or ``timm:<model>.<pretrained tag>``.
        weights: None (random init), a local file (timm's parameter names; safetensors or a PyTorch
            state dict; the ImageNet classifier may be there or not, everything else must match), or
            ``"pretrained"`` / ``"imagenet"`` (timm's pretrained weights: the tag in the name, else the
            model's default; downloaded through the Hugging Face hub). Any other word is a pretrained tag.
        frozen_bn: BatchNorm layers as timm's ``FrozenBatchNorm2d`` (fixed statistics and affine).
        pyramid_channels: width of the simple feature pyramid (plain ViTs only).
    """
    timm = _timm()
    arch = timm_model_name(name)
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=1)
        hint = f" (did you mean timm:{close[0]}?)" if close else ""
        raise BackboneError(
            f"unknown timm model {arch!r}{hint}; `timm.list_models('*word*')` lists the names"
        )
    probe = _probe(timm, arch)
    kwargs = _model_kwargs(probe)
    plain = _is_plain(probe)
    if not plain:
        kwargs = {**kwargs, "features_only": True, "out_indices": _out_indices(probe, arch)}
    if weights is None:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    elif _is_path(weights):
        model = _create_from_file(timm, arch, weights, kwargs)
    elif weights.lower() in PRETRAINED:
        model = _create_pretrained(timm, arch, kwargs)
    elif "." in arch:
        raise ValueError(f"two pretrained tags: {arch!r} names one, weights={weights!r} another; keep one")
    else:
        model = _create_pretrained(timm, f"{arch}.{weights}", kwargs)
    if frozen_bn:
        model = timm.layers.freeze_batch_norm_2d(model)
    if not plain:
        return TimmFeaturesBackbone(model, name)
    model.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)
    return TimmViTBackbone(model, name, pyramid_channels)
