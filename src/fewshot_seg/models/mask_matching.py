"""Mask Matching module (MM-Former stage 2): Self-Alignment, Cross-Alignment, learnable matching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.attention_layers import CrossAttentionLayer, FFNLayer
from fewshot_seg.models.backbone_base import SIZE_DIVISIBILITY
from fewshot_seg.models.position_encoding import PositionEmbeddingSine
from fewshot_seg.models.selection import PROPOSAL_STRIDE, upsample_to_image

MATCHED_LEVELS = ("res5", "res4", "res3")
"""The backbone levels Mask Matching aligns, coarsest first (its conv_0/1/2, crossat_0/1/2)."""
SUPPORT_PROTO_EPS = 1e-7


@dataclass
class SupportLevel:
    """One feature level of an encoded support set; every map is ``[K*Bs, C, h, w]``, shot-major."""

    self_aligned: Tensor
    """the backbone map after Self-Alignment (before the 1x1 reduction)."""
    masked: Tensor
    """the reduced map times the (bilinearly resized) support mask: the Cross-Alignment input."""
    pos_masked: Tensor
    """the positional encoding times the mask."""
    proto_mask: Tensor
    """``[K*Bs, 1, h, w]`` the mask resized with align_corners=True, for masked average pooling."""


@dataclass
class SupportEncoding:
    """What :meth:`MaskMatching.encode_supports` computes once for K supports (Bs support sets)."""

    shot: int
    batch: int
    levels: dict[str, SupportLevel]


class SelfAlignment(nn.Module):
    """Parameter-free global-context gating.

    ``a = softmax_HW(mean_C(x))``, ``ctx = sum_HW x * a`` per channel, ``y = x * sigmoid(ctx)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``."""
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        attn = flat.mean(dim=1).softmax(dim=-1)  # [B, HW]
        context = torch.matmul(flat, attn.unsqueeze(-1))  # [B, C, 1]
        return x * context.sigmoid().unsqueeze(-1)


def kv_resize_hw(hw: Sequence[int], min_size: int) -> tuple[int, int]:
    """Key/value size of a map: short side ``min_size``, long side ``int(long * min_size / short)``."""
    h, w = int(hw[0]), int(hw[1])
    if h <= w:
        return min_size, int(w * min_size / h)
    return int(h * min_size / w), min_size


def _flatten(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [HW, B, C]`` (sequence-first tokens)."""
    return x.flatten(2).permute(2, 0, 1)


class CrossAlignment(nn.Module):
    """Bidirectional cross-attention between query and support maps with shared layers.

    The same ``num_layers`` x [cross-attention -> FFN] stack updates the query tokens attending to the
    support, then (from the inputs again) the support tokens attending to the query. Keys/values are the
    *input* maps of the other branch, resized to a short side of ``kv_min_size`` unless the query map already
    has a side of that size (the reference decides for both branches from the query alone). No key-padding
    mask: masked-out support tokens are zeros that still enter the softmax.

    Args:
        hidden_dim: channels C.
        nhead: attention heads.
        dim_feedforward: FFN width.
        num_layers: depth of the shared stack.
        kv_min_size: short side of the key/value maps.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nhead: int = 4,
        dim_feedforward: int = 512,
        num_layers: int = 2,
        kv_min_size: int = 15,
    ) -> None:
        super().__init__()
        self.kv_min_size = kv_min_size
        # Mask2Former's layers (the reference's CrossAT is built from them): xavier matrices at construction.
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nhead) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layers)
        )

    def kv_sizes(
        self, query_hw: Sequence[int], support_hw: Sequence[int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Key/value sizes ``(query_kv_hw, support_kv_hw)`` used for maps of these sizes."""
        if self.kv_min_size in (int(query_hw[0]), int(query_hw[1])):
            return (int(query_hw[0]), int(query_hw[1])), (int(support_hw[0]), int(support_hw[1]))
        return kv_resize_hw(query_hw, self.kv_min_size), kv_resize_hw(support_hw, self.kv_min_size)

    def _attend(self, tokens: Tensor, pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        for cross, ffn in zip(self.transformer_cross_attention_layers, self.transformer_ffn_layers):
            tokens = ffn(cross(tokens, memory, pos=memory_pos, query_pos=pos))
        return tokens

    def forward(
        self, query: Tensor, support: Tensor, pos_query: Tensor, pos_support: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Align query and support maps to each other.

        Args:
            query: ``[B, C, h, w]``.
            support: ``[B, C, sh, sw]`` (already multiplied by the support mask).
            pos_query: ``[B or 1, C, h, w]`` positional encoding of the query map.
            pos_support: ``[B or 1, C, sh, sw]`` (already multiplied by the support mask).

        Returns:
            ``(query' [B, C, h, w], support' [B, C, sh, sw])``.
        """
        b = query.shape[0]
        pos_query = pos_query.expand(b, -1, -1, -1)
        pos_support = pos_support.expand(b, -1, -1, -1)
        q_hw, s_hw = query.shape[-2:], support.shape[-2:]
        q_kv_hw, s_kv_hw = self.kv_sizes(q_hw, s_hw)
        q_kv, q_kv_pos, s_kv, s_kv_pos = query, pos_query, support, pos_support
        if q_kv_hw != tuple(q_hw) or s_kv_hw != tuple(s_hw):
            # Map and PE are resized together (one interpolate call each branch).
            q_both = F.interpolate(
                torch.cat([query, pos_query.to(query.dtype)], 1),
                size=q_kv_hw,
                mode="bilinear",
                align_corners=False,
            )
            s_both = F.interpolate(
                torch.cat([support, pos_support.to(support.dtype)], 1),
                size=s_kv_hw,
                mode="bilinear",
                align_corners=False,
            )
            q_kv, q_kv_pos = q_both.chunk(2, dim=1)
            s_kv, s_kv_pos = s_both.chunk(2, dim=1)
        q_out = self._attend(_flatten(query), _flatten(pos_query), _flatten(s_kv), _flatten(s_kv_pos))
        s_out = self._attend(_flatten(support), _flatten(pos_support), _flatten(q_kv), _flatten(q_kv_pos))
        return q_out.permute(1, 2, 0).reshape(query.shape), s_out.permute(1, 2, 0).reshape(support.shape)


class MaskMatching(nn.Module):
    """Stage-2 Mask Matching head: scores POS proposals against the support and merges them.

    Args:
        in_channels: backbone channels of (res5, res4, res3).
        hidden_dim: channels after the 1x1 reductions and in Cross-Alignment.
        nhead: Cross-Alignment heads.
        dim_feedforward: Cross-Alignment FFN width.
        num_layers: Cross-Alignment depth.
        num_proposals: N, the number of POS proposals (input size of the matching MLP).
        matching_hidden: hidden width of the matching MLP.
        kv_min_size: short side of the Cross-Alignment keys/values.
        stride: stride of the proposal logits w.r.t. the padded image (the backbone's res2).
        size_divisibility: padding multiple of the backbone (support masks are padded to it); both
            defaults are the backbone contract's (``models.backbone_base``).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (2048, 1024, 512),
        hidden_dim: int = 256,
        nhead: int = 4,
        dim_feedforward: int = 512,
        num_layers: int = 2,
        num_proposals: int = 100,
        matching_hidden: int = 500,
        kv_min_size: int = 15,
        stride: int = PROPOSAL_STRIDE,
        size_divisibility: int = SIZE_DIVISIBILITY,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(MATCHED_LEVELS):
            raise ValueError(f"in_channels must give {len(MATCHED_LEVELS)} values (res5, res4, res3)")
        self.levels = MATCHED_LEVELS
        self.num_proposals = num_proposals
        self.stride = stride
        self.size_divisibility = size_divisibility
        self.self_align = SelfAlignment()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        for i, c in enumerate(in_channels):
            self.add_module(f"conv_{i}", nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False))
            self.add_module(
                f"crossat_{i}", CrossAlignment(hidden_dim, nhead, dim_feedforward, num_layers, kv_min_size)
            )
        self.fc1 = nn.Linear(num_proposals, matching_hidden)
        self.fc2 = nn.Linear(matching_hidden, num_proposals)

    def _support_mask(self, support_masks: Tensor, res5_hw: Sequence[int]) -> Tensor:
        """``[B, K, Hs, Ws]`` {0,1,255} -> ``[K*B, 1, Hp, Wp]`` float {0,1} zero-padded like the image."""
        b, k, hs, ws = support_masks.shape
        mask = (support_masks == 1).float()  # 255 -> background
        hp, wp = res5_hw[0] * self.size_divisibility, res5_hw[1] * self.size_divisibility
        if hp < hs or wp < ws:
            raise ValueError(f"support masks {hs}x{ws} larger than the padded support image {hp}x{wp}")
        mask = F.pad(mask, (0, wp - ws, 0, hp - hs))
        return mask.transpose(0, 1).reshape(k * b, 1, hp, wp)  # shot-major, matching the stacked features

    def encode_supports(
        self, support_feats: list[dict[str, Tensor]], support_masks: Tensor
    ) -> SupportEncoding:
        """Everything of the head that depends on the supports alone (computed once per support set).

        Args:
            support_feats: K dicts ``res3/res4/res5`` of ``[Bs, C_l, h'_l, w'_l]`` (sizes may differ).
            support_masks: ``[Bs, K, Hs, Ws]`` in {0, 1, 255} at the unpadded support image size.

        Returns:
            The per-level support maps after Self-Alignment, the 1x1 reduction and the mask; Bs is 1 when one
            support set serves a whole batch of queries (:meth:`match` broadcasts it).
        """
        k = len(support_feats)
        mask_full = self._support_mask(support_masks, support_feats[0]["res5"].shape[-2:])
        levels = {}
        for i, level in enumerate(self.levels):
            conv: nn.Conv2d = getattr(self, f"conv_{i}")
            # K shots stacked shot-major on the batch axis -> [K*Bs, ...].
            s_sa = self.self_align(torch.cat([sf[level] for sf in support_feats], 0))
            s = conv(s_sa)
            s_hw = s.shape[-2:]
            m = F.interpolate(mask_full, size=s_hw, mode="bilinear", align_corners=False)
            levels[level] = SupportLevel(
                self_aligned=s_sa,
                masked=s * m,
                pos_masked=self.pe_layer(s[:1]) * m,
                # Prototype masks use align_corners=True, as the reference.
                proto_mask=F.interpolate(mask_full, size=s_hw, mode="bilinear", align_corners=True),
            )
        return SupportEncoding(shot=k, batch=int(support_masks.shape[0]), levels=levels)

    def forward(
        self,
        query_feats: dict[str, Tensor],
        support_feats: list[dict[str, Tensor]],
        support_masks: Tensor,
        proposal_logits: Tensor,
        image_size: tuple[int, int],
        return_intermediates: bool = False,
    ) -> dict[str, Tensor | dict]:
        """Score and merge the POS proposals of K-shot episodes: :meth:`encode_supports`, then :meth:`match`.

        Args:
            query_feats: ``res3/res4/res5`` maps of the (padded) query, ``[B, C_l, h_l, w_l]``.
            support_feats: K dicts with the same keys, ``[B, C_l, h'_l, w'_l]`` (supports may differ in size).
            support_masks: ``[B, K, Hs, Ws]`` in {0, 1, 255} at the unpadded support image size.
            proposal_logits: ``[B, N, Hp/4, Wp/4]`` POS mask logits of the query.
            image_size: unpadded query size ``(H, W)``.
            return_intermediates: also return prototypes and per-level maps (tests / debugging).

        Returns:
            ``foreground [B, H, W]`` merged map (foreground where > 0.5), ``similarity [B, N]`` cosine S,
            ``coeff [B, N]``, ``proposals [B, N, Hp/4, Wp/4]`` sigmoid; plus ``intermediates`` on request.
        """
        supports = self.encode_supports(support_feats, support_masks)
        return self.match(query_feats, supports, proposal_logits, image_size, return_intermediates)

    def match(
        self,
        query_feats: dict[str, Tensor],
        supports: SupportEncoding,
        proposal_logits: Tensor,
        image_size: tuple[int, int],
        return_intermediates: bool = False,
    ) -> dict[str, Tensor | dict]:
        """:meth:`forward` on encoded supports (their batch: the queries' B, or 1 = one set for all)."""
        k = supports.shot
        b, n = proposal_logits.shape[:2]
        if n != self.num_proposals:
            raise ValueError(f"expected {self.num_proposals} proposals, got {n}")
        if supports.batch not in (1, b):
            raise ValueError(f"supports encoded for a batch of {supports.batch}, queries batch {b}")
        proposals = proposal_logits.sigmoid()

        inter: dict[str, dict] = {
            key: {}
            for key in (
                "self_align_query",
                "self_align_support",
                "reduced_query",
                "pos_query",
                "support_masked",
                "support_pos_masked",
                "cross_query",
                "cross_support",
                "proto_support_per_level",
                "kv_hw",
            )
        }
        proto_q_levels, proto_s_levels = [], []
        for i, level in enumerate(self.levels):
            conv: nn.Conv2d = getattr(self, f"conv_{i}")
            crossat: CrossAlignment = getattr(self, f"crossat_{i}")
            sup = supports.levels[level]
            # Query branch (computed once, then shared by the K shots).
            q_sa = self.self_align(query_feats[level])
            q = conv(q_sa)
            pos_q = self.pe_layer(q[:1])
            s_masked, pos_s = _per_query(sup.masked, k, b), _per_query(sup.pos_masked, k, b)
            m_proto = _per_query(sup.proto_mask, k, b)
            s_hw = s_masked.shape[-2:]
            q_out, s_out = crossat(q.repeat(k, 1, 1, 1), s_masked, pos_q, pos_s)

            # Prototypes by masked average pooling.
            proto_s = (s_out * m_proto).sum((2, 3)) / (m_proto.sum((2, 3)) + SUPPORT_PROTO_EPS)  # [K*B, C]
            props = F.interpolate(proposals, size=q.shape[-2:], mode="bilinear", align_corners=True)
            q_out = q_out.reshape(k, b, *q_out.shape[1:])
            # The reference divides without epsilon; the clamp only guards fully underflowed proposals.
            area = props.sum((2, 3)).clamp_min(torch.finfo(props.dtype).tiny)  # [B, N]
            proto_q = torch.einsum("kbchw,bnhw->kbnc", q_out, props.to(q_out.dtype)) / area[None, :, :, None]
            proto_q_levels.append(proto_q)
            proto_s_levels.append(proto_s.reshape(k, b, -1))

            if return_intermediates:
                inter["self_align_query"][level] = q_sa
                inter["self_align_support"][level] = _per_query(sup.self_aligned, k, b).reshape(
                    k, b, *sup.self_aligned.shape[1:]
                )
                inter["reduced_query"][level] = q
                inter["pos_query"][level] = pos_q.expand_as(q)
                inter["support_masked"][level] = s_masked.reshape(k, b, *s_masked.shape[1:])
                inter["support_pos_masked"][level] = pos_s.reshape(k, b, *pos_s.shape[1:])
                inter["cross_query"][level] = q_out
                inter["cross_support"][level] = s_out.reshape(k, b, *s_out.shape[1:])
                inter["proto_support_per_level"][level] = proto_s.reshape(k, b, -1)
                inter["kv_hw"][level] = crossat.kv_sizes(q.shape[-2:], s_hw)

        proto_q = torch.cat(proto_q_levels, -1).mean(0)  # [B, N, 3C], averaged over shots
        proto_s = torch.cat(proto_s_levels, -1).mean(0)  # [B, 3C]
        similarity = F.cosine_similarity(proto_q, proto_s[:, None, :].expand_as(proto_q), dim=2, eps=1e-8)
        coeff = self.fc2(F.relu(self.fc1(similarity)))
        # Upsampling is linear, so merging at stride 4 and upsampling once equals merging upsampled maps.
        merged = torch.einsum("bn,bnhw->bhw", coeff, proposals.to(coeff.dtype))
        foreground = upsample_to_image(merged[:, None], image_size, self.stride)[:, 0]
        out: dict[str, Tensor | dict] = {
            "foreground": foreground,
            "similarity": similarity,
            "coeff": coeff,
            "proposals": proposals,
        }
        if return_intermediates:
            inter["proto_query"] = proto_q
            inter["proto_support"] = proto_s
            out["intermediates"] = inter
        return out


def _per_query(x: Tensor, k: int, b: int) -> Tensor:
    """``[K*Bs, ...]`` shot-major support maps -> ``[K*B, ...]``: a single set (Bs = 1) serves every query."""
    if x.shape[0] == k * b:
        return x
    return x.reshape(k, 1, *x.shape[1:]).expand(k, b, *x.shape[1:]).reshape(k * b, *x.shape[1:])


__all__ = [
    "CrossAlignment",
    "MaskMatching",
    "SelfAlignment",
    "SupportEncoding",
    "SupportLevel",
    "kv_resize_hw",
]
