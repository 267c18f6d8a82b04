"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

Three implementations of the same core function (bilinear sampling with ``align_corners=False`` and zeros
outside, weighted by the attention weights; gradients w.r.t. values, sampling locations and attention
weights), none of which needs a compiled extension:

* ``"gather"`` (:func:`ms_deform_attn_core_gather`, the default): one ``embedding_bag`` over the values of
  all levels, one bag of ``L*P*4`` bilinear neighbours per (query, head), with a hand-written backward.
* ``"grid_sample"`` (:func:`ms_deform_attn_core_grid_sample`): one ``grid_sample`` per level covering all
  heads and points.
* ``"loop"`` (:func:`ms_deform_attn_core_loop`): the straightforward per-level reference (Deformable
  DETR's ``ms_deform_attn_core_pytorch``); kept for tests and as the benchmark baseline.

:func:`ms_deform_attn_core` picks one by device unless ``impl=`` names one; :class:`MSDeformAttn` takes
its choice as a setting (``POSConfig.deform_attn``), and the environment variable ``FEWSHOT_SEG_MSDA_IMPL``,
read once when the module is built, overrides it (to A/B a run or a benchmark without editing configs).
Everything in :class:`MSDeformAttn` runs in float32, also under
autocast: sampling locations are sub-pixel coordinates and the softmax over few points is sensitive to half
precision.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.linear import linear_rows
from fewshot_seg.models.size_cache import SizeCache

SpatialShapes = Tensor | Sequence[Sequence[int]]

IMPLEMENTATIONS = ("gather", "grid_sample", "loop")
IMPL_ENV = "FEWSHOT_SEG_MSDA_IMPL"

# Zero border (pixels) around every level in the gather table. The top-left neighbour is clamped to
# [-2, W] x [-2, H]; a clamped point then has both neighbours of that axis in the border, so it reads zeros
# and gets zero gradient exactly like an out-of-range point of grid_sample, and no validity masks are needed.
_PAD = 2


def _shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def impl_override() -> str | None:
    """The implementation ``FEWSHOT_SEG_MSDA_IMPL`` forces, or None (read when an MSDeformAttn is built)."""
    forced = os.environ.get(IMPL_ENV, "").strip()
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPL_ENV}={forced!r}; choose from {IMPLEMENTATIONS}")
    return forced or None


def default_impl(device: torch.device) -> str:
    """Implementation :func:`ms_deform_attn_core` uses on ``device`` when none is chosen: ``gather`` on
    every device."""
    # gather (embedding_bag + an SDDMM) is the fastest on the CPU (benchmarks/model_speed.py) and, measured
    # on an H200 (docs/gpu.md), for training on CUDA too: 4.9 ms forward + backward at batch 8 against
    # 12.9 for grid_sample, whose backward scatters with atomics. One implementation also gives a GPU run
    # the CPU's numerics.
    del device
    return "gather"


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str | None = None,
) -> Tensor:
    """Weighted sum of bilinear samples taken at the sampling locations of every level.

    Args:
        value: ``[N, S, M, D]`` (S = sum_l H_l*W_l, levels concatenated, each row-major ``H x W``;
            M heads of D channels).
        spatial_shapes: ``[L, 2]`` (H_l, W_l) as a tensor or a sequence of pairs.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` normalised, last dim (x, y); pixel j has centre
            (j + 0.5) / W; points outside [0, 1] read zeros beyond the border.
        attention_weights: ``[N, Lq, M, L, P]`` (already normalised over L*P).
        impl: ``"gather"``, ``"grid_sample"`` or ``"loop"``; None = :func:`default_impl` of the device.

    Returns:
        ``[N, Lq, M*D]``, channel = head * D + d.
    """
    impl = impl or default_impl(value.device)
    if impl == "gather":
        return ms_deform_attn_core_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "grid_sample":
        return ms_deform_attn_core_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "loop":
        return ms_deform_attn_core_loop(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}")


def ms_deform_attn_core_loop(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Straightforward per-level reference (Deformable DETR's pure-PyTorch ``ms_deform_attn_core_pytorch``).

    One ``grid_sample`` per level with the heads folded into the batch, then the weighted sum over all
    levels and points at once. Same arguments and result as :func:`ms_deform_attn_core`; kept for tests and
    as the baseline of ``benchmarks/model_speed.py``.
    """
    shapes = _shapes_as_list(spatial_shapes)
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # [N*M, D, H, W]
        grid = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_core_grid_sample(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """One ``grid_sample`` per level covering all heads and points (the GPU path).

    Same arguments and result as :func:`ms_deform_attn_core`.
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
        # floats instead of D scattered planes.
        v = value_per_level[lvl].transpose(1, 2).reshape(n * m, h, w, d).permute(0, 3, 1, 2)
        # Points before queries, so the weighted sum below reduces over a non-innermost dim. contiguous():
        # grid_sample is several times slower on a strided grid.
        g = grids[:, :, :, lvl].permute(0, 2, 3, 1, 4).reshape(n * m, num_points, lq, 2).contiguous()
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled [N*M, D, P, Lq]; weights [N*M, 1, P, Lq]. The weighted sum over P accumulates in place
        # instead of materialising another [N*M, D, P, Lq] product.
        wts = attention_weights[:, :, :, lvl].permute(0, 2, 3, 1).reshape(n * m, 1, num_points, lq)
        for pt in range(num_points):
            if out is None:
                out = sampled[:, :, pt] * wts[:, :, pt]
            else:
                out.addcmul_(sampled[:, :, pt], wts[:, :, pt])
    assert out is not None
    return out.reshape(n, m * d, lq).transpose(1, 2).contiguous()


_CONSTANTS: SizeCache[Tensor] = SizeCache(256)


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor made once per (values, dtype, device): a tensor from Python values is a
    blocking host-to-device copy on a GPU, at every layer of every step otherwise. Read only."""
    return _CONSTANTS.get((values, dtype, device), lambda: torch.tensor(values, dtype=dtype, device=device))


def _level_layout(shapes: list[tuple[int, int]]) -> tuple[list[int], list[int], int]:
    """Start of every level in the flattened values and in the padded frame, and the frame's length."""
    starts, padded_starts = [], []
    s = sp = 0
    for h, w in shapes:
        starts.append(s)
        padded_starts.append(sp)
        s += h * w
        sp += (h + 2 * _PAD) * (w + 2 * _PAD)
    return starts, padded_starts, sp


@dataclass(frozen=True)
class _GatherPlan:
    """Index constants of one (levels, N, Lq, M, P, dtype, device), made once (:func:`_gather_plan`).

    The neighbours are located in a padded frame: every level of every (n, m) surrounded by a ``_PAD``-pixel
    zero border, frame position ``(n*M + m) * Sp + start'_l + (y + PAD) * (W + 2 PAD) + x + PAD``. The
    values are not copied into that frame: ``frame_to_row`` maps a frame position to its row of the value
    rows ``[N*S*M + 1, D]`` (``value.view(-1, D)`` plus one zero row, the row of every border position).
    Per-point tensors are ``[2, LP]`` (row 0 x / width, row 1 y / height).
    """

    frame_to_row: Tensor  # [N*M*Sp] index dtype
    size: Tensor  # [2, LP] float (W_l, H_l)
    shift: Tensor  # [2, LP] float: PAD - 0.5
    corner_max: Tensor  # [2, LP] index dtype: (W_l + PAD, H_l + PAD)
    frame_width: Tensor  # [LP] index dtype: W_l + 2 PAD
    frame_start: Tensor  # [N, 1, M, LP] index dtype: (n*M + m) * Sp + start'_l
    neighbours: Tensor  # [4, LP] index dtype: offsets of (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1)
    csr_rows: Tensor  # [N*Lq*M + 1] index dtype: 4*L*P entries per bag


_PLANS: SizeCache[_GatherPlan] = SizeCache(16)  # a few MB each at the paper's sizes


def _gather_plan(
    shapes: list[tuple[int, int]],
    n: int,
    lq: int,
    m: int,
    num_points: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _GatherPlan:
    """The :class:`_GatherPlan` of these sizes, cached: an encoder runs every layer at the same sizes, and
    made per call its constants are a third of the layer's operations."""
    key = (tuple(shapes), n, lq, m, num_points, dtype, device)
    return _PLANS.get(key, lambda: _make_gather_plan(shapes, n, lq, m, num_points, dtype, device))


def _make_gather_plan(
    shapes: list[tuple[int, int]],
    n: int,
    lq: int,
    m: int,
    num_points: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _GatherPlan:
    """A new :class:`_GatherPlan` (on the host, then moved to ``device`` once)."""
    starts, padded_starts, sp = _level_layout(shapes)
    s = starts[-1] + shapes[-1][0] * shapes[-1][1]
    rows = n * s * m + 1
    idx = torch.int32 if max(rows, n * m * sp) < 2**31 else torch.int64
    # Frame position -> value row; border positions -> the zero row (rows - 1).
    frame = torch.full((n, m, sp), rows - 1, dtype=torch.int64)
    nm_rows = torch.arange(n).view(n, 1, 1) * s * m + torch.arange(m).view(1, m, 1)  # row of pixel 0
    for (h, w), s0, sp0 in zip(shapes, starts, padded_starts):
        hp, wp = h + 2 * _PAD, w + 2 * _PAD
        pixels = (s0 + torch.arange(h * w)).view(1, 1, h, w) * m
        frame[:, :, sp0 : sp0 + hp * wp].view(n, m, hp, wp)[:, :, _PAD : _PAD + h, _PAD : _PAD + w] = (
            pixels + nm_rows.view(n, m, 1, 1)
        )
    per_point = [
        (w, h, w + 2 * _PAD, sp0) for (h, w), sp0 in zip(shapes, padded_starts) for _ in range(num_points)
    ]
    consts = torch.tensor(per_point, dtype=torch.int64).t()  # [4, LP]
    lp = len(per_point)
    wpad = consts[2]
    bags = n * lq * m
    return _GatherPlan(
        frame_to_row=frame.flatten().to(device=device, dtype=idx),
        size=consts[:2].to(device=device, dtype=dtype),
        shift=torch.full((2, lp), _PAD - 0.5, dtype=dtype, device=device),
        corner_max=(consts[:2] + _PAD).to(device=device, dtype=idx),
        frame_width=wpad.to(device=device, dtype=idx),
        frame_start=(torch.arange(n * m).view(n, 1, m, 1) * sp + consts[3]).to(device=device, dtype=idx),
        neighbours=torch.stack([torch.zeros_like(wpad), torch.ones_like(wpad), wpad, wpad + 1]).to(
            device=device, dtype=idx
        ),
        csr_rows=torch.arange(0, bags * 4 * lp + 1, 4 * lp, dtype=idx, device=device),
    )


class _GatherCore(torch.autograd.Function):
    """Bilinear multi-scale sampling as one weighted ``embedding_bag`` (:func:`ms_deform_attn_core_gather`).

    Notation: B = N*Lq*M bags (one per query and head, in output order), LP = L*P points per bag,
    K = 4*LP neighbours per bag ordered (neighbour, point), R = N*S*M + 1 value rows (the last is zero).
    Per-point tensors are kept planar (``[B, 2, LP]`` rather than ``[B, LP, 2]``): elementwise ops that
    broadcast over a last dim of 2 run ~10x slower on CPU than over a last dim of LP.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        value: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        shapes: list[tuple[int, int]],
    ) -> Tensor:
        n, s, m, d = value.shape
        _, lq, _, num_levels, num_points, _ = sampling_locations.shape
        device, dtype = value.device, value.dtype
        plan = _gather_plan(shapes, n, lq, m, num_points, dtype, device)
        index_dtype = plan.frame_to_row.dtype
        bags, lp = n * lq * m, num_levels * num_points

        # Rows [R, D]: value[n, pixel, m] is row (n*S + pixel)*M + m, a D-row per pixel and head (one
        # contiguous read per neighbour); the appended zero row is what every border neighbour reads.
        rows = F.pad(value.reshape(n * s * m, d), (0, 0, 0, 1))

        # Pixel coordinate in the padded frame: x*W - 0.5 (align_corners=False) + PAD.
        pix = torch.empty(bags, 2, lp, dtype=dtype, device=device)
        torch.addcmul(plan.shift, sampling_locations.view(bags, lp, 2).transpose(1, 2), plan.size, out=pix)
        # Top-left neighbour, clamped to [0, W + PAD]: a clamped point then has both neighbours of that axis
        # in the zero border (see _PAD). Truncation differs from floor only below 0, where it is clamped
        # anyway, and clamping the integers (not the floats) also maps NaN/inf locations into the border.
        corner = pix.to(index_dtype).clamp_(min=0)
        corner = torch.minimum(corner, plan.corner_max, out=corner)
        frac = torch.frac(pix)  # [B, 2, LP]; used only where the neighbours are not all border zeros

        top_left = torch.addcmul(corner[:, 0], corner[:, 1], plan.frame_width)  # x + y*W' in the level
        top_left.view(n, lq, m, lp).add_(plan.frame_start)  # + level and (n, m) block starts
        frame_index = (top_left.unsqueeze(1) + plan.neighbours).view(-1)  # [B*4*LP], (neighbour, point)
        index = plan.frame_to_row.index_select(0, frame_index).view(bags, 4 * lp)

        attn = attention_weights.reshape(bags, lp)
        # Linear weights [B, 2 (x, y), 2 (neighbour 0, 1), LP] = (1 - f, f) in one op.
        lin = _constant(((1.0,), (0.0,)), dtype, device)
        slope = _constant(((-1.0,), (1.0,)), dtype, device)
        axis_weights = torch.addcmul(lin, frac.unsqueeze(2), slope)
        attn_y = axis_weights[:, 1] * attn.unsqueeze(1)  # [B, 2 (dy), LP]
        weights = (attn_y.unsqueeze(2) * axis_weights[:, 0].unsqueeze(1)).view(bags, 4 * lp)

        out = F.embedding_bag(index, rows, mode="sum", per_sample_weights=weights)  # [B, D]
        ctx.save_for_backward(rows, index, weights, frac, attn)
        ctx.plan = plan
        ctx.dims = (n, s, m, d, lq, num_levels, num_points)
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _GatherCore._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        rows, index, weights, frac, attn = ctx.saved_tensors
        plan: _GatherPlan = ctx.plan
        n, s, m, d, lq, num_levels, num_points = ctx.dims
        bags, lp = attn.shape
        grad = grad_out.reshape(bags, d).to(rows.dtype).contiguous()
        grad_value = grad_loc = grad_attn = None

        if ctx.needs_input_grad[0]:
            # Every row but the zero row, which is not a value.
            grad_value = _scatter_rows(grad, index, weights, rows.shape[0])[:-1].view(n, s, m, d)

        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # g[b, k] = <grad[b], rows[index[b, k]]> for every neighbour: an SDDMM on the bag x row pattern
            # (one fused gather-dot, ~6x faster than embedding_bag's per-sample-weight backward).
            pattern = _csr_pattern(plan.csr_rows, index, rows.shape[0], rows.dtype)
            g = torch.sparse.sampled_addmm(pattern, grad, rows.t(), beta=0.0).values().view(bags, 4, lp)
            g00, g01, g10, g11 = g.unbind(1)
            fx, fy = frac.unbind(1)
            # The bilinear form of the four neighbour gradients: its x and y slopes and its value at (fx, fy).
            ex0 = g01 - g00
            ey0 = g10 - g00
            cross = g11 - g10 - ex0
            slope_x = torch.addcmul(ex0, fy, cross)  # d sample / d fx
            slope_y = torch.addcmul(ey0, fx, cross)  # d sample / d fy
            if ctx.needs_input_grad[2]:
                grad_attn = torch.addcmul(torch.addcmul(g00, fx, ex0), fy, slope_y)
                grad_attn = grad_attn.view(n, lq, m, num_levels, num_points)
            if ctx.needs_input_grad[1]:
                # d fx / d x = W_l. Clamped points read only border zeros: their g's, hence slopes, are 0.
                grad_loc = torch.empty(bags, lp, 2, dtype=grad.dtype, device=grad.device)
                torch.mul(slope_x, attn, out=grad_loc[..., 0])
                torch.mul(slope_y, attn, out=grad_loc[..., 1])
                grad_loc = grad_loc.mul_(plan.size.t()).view(n, lq, m, num_levels, num_points, 2)
        return grad_value, grad_loc, grad_attn, None


def _csr_pattern(crow: Tensor, index: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``[B, K]`` neighbour indices as a ``[B, rows]`` CSR pattern (K entries per bag, zero values; ``crow``
    the ``[B + 1]`` row starts). The values are made per call: B*K floats, too many to keep."""
    with warnings.catch_warnings():
        # Sparse CSR is "beta" in torch; the only op used on it (sampled_addmm) is tested here.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            crow,
            index.view(-1),
            torch.zeros(index.numel(), dtype=dtype, device=index.device),
            size=(index.shape[0], rows),
            check_invariants=False,
        )


def _scatter_rows(grad: Tensor, index: Tensor, weights: Tensor, rows: int) -> Tensor:
    """``out[r] = sum_{(b, k): index[b, k] = r} weights[b, k] * grad[b]`` -> ``[rows, D]``.

    The transpose of the forward embedding_bag, computed as another embedding_bag over the entries sorted
    by row (one radix sort of int indices): a scatter-add without atomics or materialising ``[B*K, D]``.
    embedding_bag's own backward does the same sort but then accumulates row by row, ~2x slower.
    """
    k = index.shape[1]
    flat = index.view(-1)
    order = flat.sort().indices
    counts = torch.bincount(flat, minlength=rows)
    offsets = torch.cumsum(counts, 0).sub_(counts)  # exclusive prefix sum: first entry of every row
    bag = torch.div(order, k, rounding_mode="floor")
    return F.embedding_bag(
        bag, grad, offsets, mode="sum", per_sample_weights=weights.view(-1).index_select(0, order)
    )


def ms_deform_attn_core_gather(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Gather formulation (the CPU path): all levels, heads and points in one weighted ``embedding_bag``.

    The values of all levels and heads are one table of D-rows (plus a zero row that every neighbour
    outside its level reads); every (query, head) is one bag of its L*P*4 bilinear neighbours with
    per-sample weight bilinear weight x attention weight. Nothing of size ``[.., L*P*4, D]`` is
    materialised. Backward: values by the transposed bag sum (a sort of the indices), locations and
    attention weights from the neighbour dot products of an SDDMM (``torch.sparse.sampled_addmm``). Same
    arguments and result as :func:`ms_deform_attn_core`; float32 or float64. Not twice differentiable.
    """
    shapes = _shapes_as_list(spatial_shapes)
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError("spatial_shapes do not add up to the length of value")
    # Half-precision inputs are computed in float32 (sampled_addmm has no bf16/fp16 CPU kernel, and the
    # sub-pixel fractions need the mantissa); the result comes back in the value's dtype.
    dtype = value.dtype if value.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=value.device.type, enabled=False):
        out = _GatherCore.apply(
            value.to(dtype),
            sampling_locations.to(dtype).contiguous(),
            attention_weights.to(dtype).contiguous(),
            shapes,
        )
    return out.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer.

    Args:
        d_model: channels C.
        n_levels: number of feature levels L.
        n_heads: heads M (C must divide by M).
        n_points: sampling points P per head and level.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl is not None and impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown deformable-attention implementation {impl!r}; choose from {IMPLEMENTATIONS}"
            )
        self.impl = impl_override() or impl
        """the core's implementation; None = :func:`default_impl` of the input's device."""
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
        # The projections on [rows, C] views (linear_rows: F.linear's arithmetic, fewer views).
        value = linear_rows(input_flatten, self.value_proj.weight, self.value_proj.bias)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None, None], 0.0)
        offsets = linear_rows(query, self.sampling_offsets.weight, self.sampling_offsets.bias)
        offsets = offsets.view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = linear_rows(query, self.attention_weights.weight, self.attention_weights.bias)
        weights = weights.view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # Offsets are in pixels of each level: normalise by (W_l, H_l) to match the (x, y) layout.
        normalizer = _constant(tuple(((w, h),) for h, w in shapes), query.dtype, query.device)  # [L, 1, 2]
        locations = reference_points.reshape(n, lq, 1, self.n_levels, 1, 2) + offsets / normalizer
        out = ms_deform_attn_core(value, shapes, locations, weights, impl=self.impl)
        return linear_rows(out, self.output_proj.weight, self.output_proj.bias).view(n, lq, self.d_model)
