"""Rebuilding the trained stage-2 networks (backbone, POS, Mask Matching) from a checkpoint file.

The inference path's loader: a Lightning checkpoint of ``MMModule`` (the networks its recorded
hyper-parameters describe, then its weights) or the authors' released MM-Former file (``models.convert``).
Plain ``nn.Module``s come back; nothing here imports a LightningModule, Lightning or the data layer, so
``from fewshot_seg import Segmenter`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from fewshot_seg.checkpoints import (
    PROVENANCE_KEY,
    STAGE_CLASS,
    CheckpointError,
    checkpoint_stage,
    is_lightning_checkpoint,
    read_checkpoint,
    recorded_hparams,
)
from fewshot_seg.config import BackboneConfig, MaskMatchingConfig, POSConfig, coerce
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.build import build_mask_matching, build_pos
from fewshot_seg.models.convert import (
    CheckpointMismatchError,
    has_mask_matching,
    load_reference_checkpoint,
    reference_backbone_name,
    unwrap_state_dict,
)
from fewshot_seg.models.mask_matching import MaskMatching

PAPER_IMAGE_SIZE = 480


class TrainedNetworks(NamedTuple):
    """The stage-2 networks with their weights, and the model input side they were trained at."""

    backbone: nn.Module
    pos: nn.Module
    mask_matching: MaskMatching
    image_size: int


def load_networks(path: str | os.PathLike) -> TrainedNetworks:
    """The networks of a stage-2 checkpoint of this project or of the authors' released MM-Former file.

    Raises:
        CheckpointError: naming the file: missing, unreadable, a stage-1 checkpoint, or weights that do
            not fit.
    """
    name = os.fspath(path)
    ckpt = read_checkpoint(name, "checkpoint")
    if is_lightning_checkpoint(ckpt):
        return _from_lightning(ckpt, name)
    return _from_reference(ckpt, name)


def recorded_image_size(ckpt: Mapping[str, Any]) -> int | None:
    """The model input size a Lightning checkpoint was trained at (its data record or run config)."""
    data = (ckpt.get(PROVENANCE_KEY) or {}).get("data") or {}
    if data.get("image_size"):
        return int(data["image_size"])
    config = (ckpt.get(PROVENANCE_KEY) or {}).get("config") or {}
    size = ((config.get("data") or {}).get("init_args") or {}).get("image_size")
    return int(size) if size else None


def _from_lightning(ckpt: Mapping[str, Any], path: str) -> TrainedNetworks:
    stage = checkpoint_stage(ckpt)
    if stage != "mm":
        raise CheckpointError(
            f"checkpoint {path!r} is a stage-1 ({STAGE_CLASS.get(stage, stage)}) checkpoint: segmenting "
            "needs a stage-2 (MMModule) checkpoint, e.g. .../<run>-stage2-1shot/checkpoints/last.ckpt"
        )
    hp = recorded_hparams(ckpt)
    backbone_cfg = coerce(BackboneConfig, hp.get("backbone")) or BackboneConfig()
    pos_cfg = coerce(POSConfig, hp.get("pos")) or POSConfig()
    mm_cfg = coerce(MaskMatchingConfig, hp.get("mm")) or MaskMatchingConfig()
    backbone, pos, mm = build_networks(backbone_cfg, pos_cfg, mm_cfg)
    state = ckpt["state_dict"]
    for prefix, module in (("backbone.", backbone), ("pos.", pos), ("mm.", mm)):
        part = {
            k.removeprefix(prefix): v
            for k, v in state.items()
            if k.startswith(prefix) and not k.endswith("num_batches_tracked")
        }
        result = module.load_state_dict(part, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint {path!r} does not fit the networks its hyper-parameters describe: "
                f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
    return TrainedNetworks(backbone, pos, mm, recorded_image_size(ckpt) or PAPER_IMAGE_SIZE)


def _from_reference(ckpt: Mapping[str, Any], path: str) -> TrainedNetworks:
    try:
        state = unwrap_state_dict(ckpt, path)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r}: {err}") from err
    if not has_mask_matching(state):
        raise CheckpointError(
            f"checkpoint {path!r} holds no Mask Matching weights (a stage-1 model or not an MM-Former file): "
            "segmenting needs a stage-2 checkpoint"
        )
    try:
        backbone_cfg = BackboneConfig(name=reference_backbone_name(state))
        backbone, pos, mm = build_networks(backbone_cfg, POSConfig(), MaskMatchingConfig())
        load_reference_checkpoint(state, backbone=backbone, pos=pos, mask_matching=mm)
    except CheckpointMismatchError as err:
        raise CheckpointError(f"reference checkpoint {path!r} does not fit MM-Former: {err}") from err
    return TrainedNetworks(backbone, pos, mm, PAPER_IMAGE_SIZE)


def build_networks(
    backbone_cfg: BackboneConfig, pos: POSConfig, mm: MaskMatchingConfig
) -> tuple[nn.Module, nn.Module, MaskMatching]:
    """The stage-2 networks, without weights (they come from the checkpoint)."""
    backbone = build_backbone(
        backbone_cfg.name, weights=None, frozen_bn=True, pyramid_channels=backbone_cfg.pyramid_channels
    )
    return (
        backbone,
        build_pos(pos, backbone.out_channels),
        build_mask_matching(mm, backbone.out_channels, pos.num_queries),
    )


__all__ = ["PAPER_IMAGE_SIZE", "TrainedNetworks", "build_networks", "load_networks", "recorded_image_size"]
