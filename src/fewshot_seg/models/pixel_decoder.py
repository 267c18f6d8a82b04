"""Mask2Former multi-scale deformable-attention pixel decoder (the POS pixel decoder).

Parameter names follow the reference checkpoint (``sem_seg_head.pixel_decoder.*``) so that loading is a
prefix rename. The reference also builds cross-attention blocks (``crossat_*``) that its forward never
uses; they are not built here (``convert.py`` skips them by name).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.linear import linear_rows
from fewshot_seg.models.ms_deform_attn import MSDeformAttn
from fewshot_seg.models.position_encoding import PositionEmbeddingSine
from fewshot_seg.models.size_cache import SizeCache

RESNET50_CHANNELS: dict[str, int] = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    # detectron2's c2_xavier_fill: kaiming-uniform with a=1, zero bias (the reference init).
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvNorm(nn.Conv2d):
    """Conv2d followed by a norm (kept as ``.norm`` to match reference names) and an activation."""

    def __init__(self, *args, norm: nn.Module, activation: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return self.activation(x) if self.activation is not None else x


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then FFN (ReLU), batch-first ``[B, S, C]``."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(attn))
        hidden = self.dropout2(F.relu(linear_rows(src, self.linear1.weight, self.linear1.bias)))
        ffn = self.linear2(hidden).view(src.shape)
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """``num_layers`` deep copies of ``layer`` (``.layers``), reference name ``transformer.encoder``."""

    def __init__(self, layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        # Deformable DETR's _get_clones: copies of one layer, so parameters that are not re-initialised
        # afterwards (biases of linear1/linear2, LayerNorms) start identical in every layer.
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds the level embedding to the PE and runs the encoder.

    Reference name ``transformer`` (holds ``level_embed`` and ``encoder``).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_points: int = 4,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__()
        layer = MSDeformAttnEncoderLayer(
            d_model, dim_feedforward, dropout, n_levels, n_heads, n_points, attn_impl=attn_impl
        )
        self.encoder = MSDeformAttnEncoder(layer, num_layers)
        self._ref_cache: SizeCache[Tensor] = SizeCache(16)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The reference's order: Xavier on every matrix (this draws each copy's matrices afresh), then the
        # deformable-attention init, then N(0, 1) level embedding. 1-dim parameters keep the copied values.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
        """Pixel centres ((j+0.5)/W, (i+0.5)/H) of every level, ``[B, S, L, 2]`` (no padding mask, so the
        valid ratios are 1 and the point is the same on every level)."""
        points = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
        ref = torch.cat(points, dim=0)  # [S, 2]
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def _cached_reference_points(
        self, spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device
    ) -> Tensor:
        """:meth:`reference_points`, made once per (shapes, batch, device): they depend on nothing else."""
        key = (tuple(spatial_shapes), batch, device)
        return self._ref_cache.get(key, lambda: self.reference_points(spatial_shapes, batch, device))

    def forward(
        self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """srcs / pos_embeds: per level ``[B, C, H_l, W_l]``. Returns tokens ``[B, S, C]`` and the shapes."""
        spatial_shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            dim=1,
        )
        ref = self._cached_reference_points(spatial_shapes, src_flat.shape[0], src_flat.device)
        return self.encoder(src_flat, pos_flat, ref, spatial_shapes), spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder on res3..res5 plus one FPN step to stride 4.

    Args:
        input_channels: channels of res2..res5 (default: ResNet-50).
        conv_dim: transformer / FPN width (divisible by ``norm_groups``).
        mask_dim: channels of ``mask_features``.
        num_heads, num_encoder_layers, dim_feedforward, num_points, dropout: encoder settings.
        norm_groups: GroupNorm groups.

    Forward (run in float32 even under autocast):
        features: dict with ``res2 [B, C2, H/4, W/4]`` ... ``res5 [B, C5, H/32, W/32]``.
        returns ``(mask_features [B, mask_dim, H/4, W/4],
        [ [B, conv_dim, H/32, W/32], [B, conv_dim, H/16, W/16], [B, conv_dim, H/8, W/8] ])``.
    """

    transformer_in_features: tuple[str, ...] = ("res5", "res4", "res3")  # encoder level order
    fpn_feature: str = "res2"

    def __init__(
        self,
        input_channels: Mapping[str, int] | None = None,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        num_points: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 32,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__()
        channels = dict(RESNET50_CHANNELS if input_channels is None else input_channels)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels[name], conv_dim, kernel_size=1), nn.GroupNorm(norm_groups, conv_dim)
            )
            for name in self.transformer_in_features
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            n_heads=num_heads,
            num_layers=num_encoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            n_levels=len(self.transformer_in_features),
            n_points=num_points,
            attn_impl=attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)
        self.adapter_1 = ConvNorm(
            channels[self.fpn_feature],
            conv_dim,
            kernel_size=1,
            bias=False,
            norm=nn.GroupNorm(norm_groups, conv_dim),
        )
        self.layer_1 = ConvNorm(
            conv_dim,
            conv_dim,
            kernel_size=3,
            padding=1,
            bias=False,
            norm=nn.GroupNorm(norm_groups, conv_dim),
            activation=nn.ReLU(),
        )
        _c2_xavier_fill(self.adapter_1)
        _c2_xavier_fill(self.layer_1)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        device_type = features[self.fpn_feature].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_fp32({k: v.float() for k, v in features.items()})

    def _forward_fp32(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.transformer_in_features):
            x = features[name]
            srcs.append(proj(x))
            pos.append(self.pe_layer(x))  # PE of the raw map: only its size matters
        tokens, shapes = self.transformer(srcs, pos)
        b = tokens.shape[0]
        multi_scale = [
            t.transpose(1, 2).reshape(b, self.conv_dim, h, w)
            for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        # FPN step: lateral res2 + upsampled stride-8 encoder map.
        lateral = self.adapter_1(features[self.fpn_feature])
        y = lateral + F.interpolate(
            multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        y = self.layer_1(y)
        return self.mask_features(y), multi_scale
