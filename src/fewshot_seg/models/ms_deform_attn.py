"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The core samples every level with one bilinear ``grid_sample`` call covering all heads and points
(``align_corners=False``, zeros outside), so it runs on CPU and GPU without a compiled extension and
computes the same function as the reference CUDA op. Everything here runs in float32, also under
autocast: sampling locations are sub-pixel coordinates and the softmax over few points is sensitive
to half precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Tensor | Sequence[Sequence[int]]


def _shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples taken at the sampling locations of every level.

    Args:
        value: ``[N, S, M, D]`` (S = sum_l H_l*W_l, levels concatenated, each row-major ``H x W``;
            M heads of D channels).
        spatial_shapes: ``[L, 2]`` (H_l, W_l) as a tensor or a sequence of pairs.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` in [0, 1], last dim (x, y); pixel j has centre
            (j + 0.5) / W.
        attention_weights: ``[N, Lq, M, L, P]`` (already normalised over L*P).

    Returns:
        ``[N, Lq, M*D]``, channel = head * D + d.
    """
    shapes = _shapes_as_list(spatial_shapes)
    n, _, m, d = value.shape
    _, lq, _, _, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on [-1, 1]; with align_corners=False that maps pixel j to (j+0.5)/W.
    grids = 2.0 * sampling_locations - 1.0
    out: Tensor | None = None
    for lvl, (h, w) in enumerate(shapes):
        # Heads fold into the batch so one grid_sample serves all heads and points of the level. The value
        # map is channels-last (a view after one copy): the 4 corners of a sample then read D adjacent
        # floats instead of D scattered planes (fewer cache lines on CPU).
        v = value_per_level[lvl].transpose(1, 2).reshape(n * m, h, w, d).permute(0, 3, 1, 2)
        # Points before queries, so the weighted sum below reduces over a non-innermost dim. contiguous():
        # grid_sample is several times slower on a strided grid.
        g = grids[:, :, :, lvl].permute(0, 2, 3, 1, 4).reshape(n * m, num_points, lq, 2).contiguous()
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled [N*M, D, P, Lq]; weights [N*M, 1, P, Lq]. The weighted sum over P accumulates in place:
        # (sampled * wts).sum(2) would materialise another [N*M, D, P, Lq] tensor, which made it the most
        # expensive step on CPU (page faults on large temporaries), ~5x slower than these P addcmuls.
        wts = attention_weights[:, :, :, lvl].permute(0, 2, 3, 1).reshape(n * m, 1, num_points, lq)
        for pt in range(num_points):
            if out is None:
                out = sampled[:, :, pt] * wts[:, :, pt]
            else:
                out.addcmul_(sampled[:, :, pt], wts[:, :, pt])
    assert out is not None
    return out.reshape(n, m * d, lq).transpose(1, 2).contiguous()


def ms_deform_attn_core_loop(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Straightforward per-level, per-head, per-point reference of :func:`ms_deform_attn_core`.

    Same arguments and result; kept for tests and benchmarks only (M*L*P grid_sample calls instead of L).
    """
    shapes = _shapes_as_list(spatial_shapes)
    n, _, m, d = value.shape
    _, lq, _, _, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    heads = []
    for head in range(m):
        acc = value.new_zeros(n, d, lq)
        for lvl, (h, w) in enumerate(shapes):
            v = value_per_level[lvl][:, :, head].transpose(1, 2).reshape(n, d, h, w)
            for pt in range(num_points):
                g = 2.0 * sampling_locations[:, :, head, lvl, pt] - 1.0  # [N, Lq, 2]
                s = F.grid_sample(
                    v, g[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=False
                )
                acc = acc + s[..., 0] * attention_weights[:, None, :, head, lvl, pt]
        heads.append(acc)
    return torch.cat(heads, dim=1).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer.

    Args:
        d_model: channels C.
        n_levels: number of feature levels L.
        n_heads: heads M (C must divide by M).
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions, one per head, point k at
        distance k+1; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values  # onto the unit square
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2).expand(-1, self.n_levels, self.n_points, -1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to P points per head around its reference point on each level.

        Args:
            query: ``[N, Lq, C]`` (content + positional encoding).
            reference_points: ``[N, Lq, L, 2]`` normalised (x, y) in [0, 1].
            input_flatten: ``[N, S, C]`` values, levels concatenated.
            spatial_shapes: ``[L, 2]`` (H_l, W_l).
            input_padding_mask: optional ``[N, S]`` bool, True = padding (its values become 0).

        Returns:
            ``[N, Lq, C]`` float32.
        """
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self._forward_fp32(
                query.float(),
                reference_points.float(),
                input_flatten.float(),
                spatial_shapes,
                input_padding_mask,
            )

    def _forward_fp32(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
        input_padding_mask: Tensor | None,
    ) -> Tensor:
        shapes = _shapes_as_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(shapes)}")
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        if sum(h * w for h, w in shapes) != s:
            raise ValueError("spatial_shapes do not add up to the length of input_flatten")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # Offsets are in pixels of each level: normalise by (W_l, H_l) to match the (x, y) layout.
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
        out = ms_deform_attn_core(value, shapes, locations, weights)
        return self.output_proj(out)
