"""Build the networks from their typed configurations (``fewshot_seg.config``)."""

from __future__ import annotations

from collections.abc import Mapping

from fewshot_seg.config import MaskMatchingConfig, MMLossConfig, POSConfig, POSLossConfig, as_dict
from fewshot_seg.models.criterion import MaskMatchingCriterion, POSCriterion
from fewshot_seg.models.mask_matching import MATCHED_LEVELS, MaskMatching
from fewshot_seg.models.pos import PotentialObjectsSegmenter


def build_pos(cfg: POSConfig, in_channels: Mapping[str, int]) -> PotentialObjectsSegmenter:
    """The POS of ``cfg`` on a backbone with ``in_channels`` (res2..res5), ``cfg.dim`` wide throughout."""
    return PotentialObjectsSegmenter(
        in_channels=dict(in_channels),
        conv_dim=cfg.dim,
        mask_dim=cfg.dim,
        hidden_dim=cfg.dim,
        num_queries=cfg.num_queries,
        enc_layers=cfg.enc_layers,
        enc_heads=cfg.heads,
        enc_ffn=cfg.enc_ffn,
        dec_layers=cfg.dec_layers,
        dec_heads=cfg.heads,
        dec_ffn=cfg.dec_ffn,
        norm_groups=cfg.norm_groups,
        deform_attn=cfg.deform_attn,
    )


def build_mask_matching(
    cfg: MaskMatchingConfig, in_channels: Mapping[str, int], num_proposals: int
) -> MaskMatching:
    """The Mask Matching head of ``cfg`` on a backbone with ``in_channels``, scoring ``num_proposals``."""
    return MaskMatching(
        in_channels=tuple(in_channels[level] for level in MATCHED_LEVELS),
        hidden_dim=cfg.dim,
        nhead=cfg.heads,
        dim_feedforward=cfg.ffn,
        num_layers=cfg.layers,
        num_proposals=num_proposals,
        matching_hidden=cfg.matching_hidden,
        kv_min_size=cfg.kv_min_size,
    )


def build_pos_criterion(cfg: POSLossConfig) -> POSCriterion:
    """The stage-1 criterion (Hungarian matching, point-sampled mask and dice losses, few-shot term)."""
    return POSCriterion(**as_dict(cfg))  # the config's fields are the criterion's arguments


def build_mm_criterion(cfg: MMLossConfig) -> MaskMatchingCriterion:
    """The stage-2 criterion (dice on the merged map, contrastive BCE on the similarities)."""
    return MaskMatchingCriterion(**as_dict(cfg))
