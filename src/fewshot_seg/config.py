"""Typed configuration of the two training stages, with the paper's values as defaults (SPEC §2-§4).

LightningCLI (jsonargparse) exposes each dataclass as a nested option group and YAML block, e.g.
``--model.init_args.pos.num_queries=20`` or::

    model:
      init_args:
        pos: {num_queries: 20, dim: 64}

Checkpoints store them as plain dicts (``dataclasses.asdict``), so a checkpoint loads without this
package's classes being allow-listed for ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BackboneConfig:
    """The backbone (docs/model.md, "Backbones").

    Args:
        name: torchvision ResNet (resnet18, resnet34, resnet50, resnet101), or ``timm:<model>`` for any
            timm model with stride 4/8/16/32 levels (ConvNeXt, Swin, ...) or a plain ViT (DINOv2, ...;
            through a simple feature pyramid).
        weights: ``"imagenet"`` (torchvision IMAGENET1K_V1, or timm's pretrained weights of a timm
            model; needs the file cached or a network), a local weights file, a timm pretrained tag, or
            None (random init). Stage 2 loads them only without a ``stage1_checkpoint`` (the stage-1 file
            brings the trained backbone, and a stage-2 checkpoint records ``weights: null``).
        freeze: no gradients and frozen normalisation statistics (the paper). False only without
            pretrained weights (the CPU demo trains a ResNet-18 from scratch). A ViT's feature pyramid
            is new and is trained either way.
        frozen_bn: BatchNorm layers as ``FrozenBatchNorm2d`` (fixed statistics and affine, as detectron2)
            instead of ``nn.BatchNorm2d``; None = the same as ``freeze``.
        lr_mult: learning-rate multiplier of a trainable backbone (a ViT's feature pyramid: 1).
        pyramid_channels: channels of the feature pyramid's four levels (plain ViTs only; 256 in ViTDet).
    """

    name: str = "resnet50"
    weights: str | None = "imagenet"
    freeze: bool = True
    frozen_bn: bool | None = None
    lr_mult: float = 0.1
    pyramid_channels: int = 256

    def __post_init__(self) -> None:
        # jsonargparse 4.53 turns `--model.init_args.backbone.weights=null` into the string "None".
        if isinstance(self.weights, str) and self.weights.strip().lower() in ("none", "null", ""):
            object.__setattr__(self, "weights", None)

    @property
    def uses_frozen_bn(self) -> bool:
        return self.freeze if self.frozen_bn is None else self.frozen_bn


@dataclass(frozen=True)
class POSConfig:
    """The Potential Objects Segmenter (Mask2Former head without classifier).

    Args:
        num_queries: N proposals.
        dim: width of the pixel decoder, mask features and transformer decoder.
        heads: attention heads of the deformable encoder and the masked decoder.
        enc_layers: deformable encoder layers of the pixel decoder.
        enc_ffn: FFN width of the encoder.
        dec_layers: masked-attention decoder layers (9 in the code; the paper text says 3).
        dec_ffn: FFN width of the decoder.
        norm_groups: GroupNorm groups of the pixel decoder (must divide ``dim``).
        deform_attn: the deformable-attention implementation ("gather", "grid_sample", "loop"); None =
            gather on every device. Same weights, same results up to float
            rounding: not part of the architecture (a stage-2 model may choose another than stage 1's).
    """

    num_queries: int = 100
    dim: int = 256
    heads: int = 8
    enc_layers: int = 6
    enc_ffn: int = 1024
    dec_layers: int = 9
    dec_ffn: int = 2048
    norm_groups: int = 32
    deform_attn: Literal["gather", "grid_sample", "loop"] | None = None


@dataclass(frozen=True)
class MaskMatchingConfig:
    """The stage-2 Mask Matching head.

    Args:
        dim: width of the 1x1 reductions and of Cross-Alignment.
        heads: Cross-Alignment attention heads.
        ffn: Cross-Alignment FFN width.
        layers: Cross-Alignment depth.
        matching_hidden: hidden width of the matching MLP (fc1/fc2).
        kv_min_size: short side of the Cross-Alignment keys/values (15 = 1/32 of a 480 input).
    """

    dim: int = 256
    heads: int = 4
    ffn: int = 512
    layers: int = 2
    matching_hidden: int = 500
    kv_min_size: int = 15


@dataclass(frozen=True)
class POSLossConfig:
    """Stage-1 losses (SPEC §3).

    Args:
        mask_weight: weight of the point sigmoid-BCE mask loss (and matching cost).
        dice_weight: weight of the point dice loss (and matching cost).
        fewshot_weight: weight of the few-shot dice term on the best proposal.
        num_points: points per mask for matching and losses (12,544 in the paper).
        oversample_ratio: PointRend oversampling.
        importance_sample_ratio: share of the points taken where the prediction is uncertain.
    """

    mask_weight: float = 5.0
    dice_weight: float = 5.0
    fewshot_weight: float = 10.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass(frozen=True)
class MMLossConfig:
    """Stage-2 losses (SPEC §3).

    Args:
        dice_weight: weight of the two-channel dice loss L_M.
        contrastive_weight: weight of the contrastive BCE L_co.
    """

    dice_weight: float = 10.0
    contrastive_weight: float = 6.0


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a per-step poly schedule (SPEC §4), and the batch it is tuned for.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (0 on norm layers and embeddings).
        poly_power: power of the poly schedule, stepped every optimisation step.
        max_steps: schedule length; None = the Trainer's ``max_steps`` (or its estimate).
        batch_size: episodes per optimisation step over all processes (global batch): 8 in stage 1,
            4 in stage 2 (paper). An episode DataModule whose ``batch_size`` is unset loads
            ``batch_size / (devices x nodes x accumulate_grad_batches)`` episodes per batch, so a step
            holds the paper's global batch on any number of GPUs.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    poly_power: float = 0.9
    max_steps: int | None = None
    batch_size: int = 8


def coerce(cls: type[T], value: T | Mapping[str, Any] | None) -> T | None:
    """``value`` as a ``cls`` instance: dicts (checkpoint hyper-parameters, Python callers) are converted.

    Unknown keys raise a TypeError naming them, so a typo never passes silently.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
    return cls(**value)


def as_dict(value: Any) -> Any:
    """A dataclass as a plain dict (recursively); anything else unchanged."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


RUNTIME_FIELDS = frozenset({"deform_attn"})
"""Fields that choose how a network computes, not what its weights are: never an architecture conflict."""


def differences(given: Any, recorded: Any) -> list[str]:
    """``"field: recorded vs given"`` for every architecture field where two configs of one type differ."""
    a, b = as_dict(recorded), as_dict(given)
    return [
        f"{k}: {a[k]!r} (checkpoint) vs {b.get(k)!r} (model)"
        for k in a
        if k not in RUNTIME_FIELDS and a[k] != b.get(k)
    ]
