"""Initialisation of the paper-size models against the reference's rules.

The golden tests load fixed weights and never see how parameters start; this test checks every parameter
of ``MaskMatching()`` and ``PotentialObjectsSegmenter()`` against the rule of the authors' code (Mask2Former
layers, Deformable DETR encoder, detectron2 / PyTorch defaults). A parameter that no rule covers fails, so a
new parameter cannot slip through without a stated init.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fewshot_seg.models import MaskMatching, PotentialObjectsSegmenter
from fewshot_seg.models.ms_deform_attn import MSDeformAttn
from fewshot_seg.models.transformer_decoder import MaskedTransformerDecoder

SEED = 0
STD_RTOL = 0.05  # relative std tolerance for large tensors (sampling error < 1 % at >= 4096 elements)
STD_MIN_NUMEL = 4096  # below this, uniform inits are judged by their bound only
BOUND_SLACK = 1e-6  # float32 rounding of the bound

Check = Callable[[nn.Module, str, Tensor], str | None]


def _fans(p: Tensor) -> tuple[int, int]:
    receptive = math.prod(p.shape[2:])
    return p.shape[1] * receptive, p.shape[0] * receptive


def _uniform(p: Tensor, bound: float, what: str) -> str | None:
    """``p`` looks like ``U(-bound, bound)``: inside the bound, reaching close to it, std bound/sqrt(3)."""
    x = p.detach().double().flatten()
    n = x.numel()
    top = x.abs().max().item()
    if top > bound * (1 + BOUND_SLACK):
        return f"{what}: max |x| {top:.5g} exceeds the bound {bound:.5g}"
    # P(max |x| < (1 - t) * bound) = (1 - t)^n < exp(-30) for t = 30 / n.
    reach = 1.0 - min(0.2, 30.0 / n)
    if top < reach * bound:
        return f"{what}: max |x| {top:.5g} < {reach * bound:.5g}, short of the bound {bound:.5g} (too narrow)"
    expected_std = bound / math.sqrt(3.0)
    if abs(x.mean().item()) > 6 * expected_std / math.sqrt(n):
        return f"{what}: mean {x.mean().item():.3g} not ~0"
    if n >= STD_MIN_NUMEL:
        std = x.std().item()
        if abs(std / expected_std - 1) > STD_RTOL:
            return f"{what}: std {std:.5g}, expected {expected_std:.5g}"
    return None


def xavier(model: nn.Module, name: str, p: Tensor) -> str | None:
    fan_in, fan_out = _fans(p)
    return _uniform(p, math.sqrt(6.0 / (fan_in + fan_out)), "xavier_uniform")


def _kaiming_uniform(p: Tensor, a: float, what: str) -> str | None:
    fan_in, _ = _fans(p)
    gain = math.sqrt(2.0 / (1 + a * a))
    return _uniform(p, gain * math.sqrt(3.0 / fan_in), what)


def c2_xavier(model: nn.Module, name: str, p: Tensor) -> str | None:
    return _kaiming_uniform(p, 1.0, "c2_xavier_fill (kaiming_uniform a=1)")


def torch_default_weight(model: nn.Module, name: str, p: Tensor) -> str | None:
    # nn.Linear / nn.Conv2d reset_parameters: kaiming_uniform(a=sqrt(5)), i.e. bound 1/sqrt(fan_in).
    return _kaiming_uniform(p, math.sqrt(5.0), "PyTorch default weight (bound 1/sqrt(fan_in))")


def torch_default_bias(model: nn.Module, name: str, p: Tensor) -> str | None:
    fan_in, _ = _fans(model.get_parameter(name.removesuffix("bias") + "weight"))
    return _uniform(p, 1.0 / math.sqrt(fan_in), "PyTorch default bias (bound 1/sqrt(fan_in))")


def normal(model: nn.Module, name: str, p: Tensor) -> str | None:
    x = p.detach().double().flatten()
    n = x.numel()
    tol = max(STD_RTOL, 6 * math.sqrt(1 / (2 * n)))
    if abs(x.std().item() - 1) > tol:
        return f"N(0, 1): std {x.std().item():.4g} (tolerance {tol:.3g})"
    if abs(x.mean().item()) > 6 / math.sqrt(n):
        return f"N(0, 1): mean {x.mean().item():.4g}"
    if x.abs().max().item() < 2.0:  # a normal of >= 500 draws exceeds 2 sigma somewhere (P fail < 1e-15)
        return f"N(0, 1): max |x| {x.abs().max().item():.4g} < 2 (not a normal?)"
    return None


def zeros(model: nn.Module, name: str, p: Tensor) -> str | None:
    return None if torch.equal(p, torch.zeros_like(p)) else "expected all zeros"


def ones(model: nn.Module, name: str, p: Tensor) -> str | None:
    return None if torch.equal(p, torch.ones_like(p)) else "expected all ones"


def deform_grid(model: nn.Module, name: str, p: Tensor) -> str | None:
    attn = model.get_submodule(name.removesuffix(".sampling_offsets.bias"))
    assert isinstance(attn, MSDeformAttn)
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    # Deformable DETR's grid, written out: head h points along angle 2*pi*h/heads, (cos, sin) scaled so the
    # larger |component| is 1, point i at distance i+1, the same on every level. The angles are float32 as
    # there (their rounding is visible: at 5*pi/4 the two components differ in the 7th digit).
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    expected = torch.empty(heads, levels, points, 2)
    for i in range(points):
        expected[:, :, i] = directions[:, None, :] * (i + 1)
    if torch.equal(p.detach(), expected.flatten()):
        return None
    diff = (p.detach() - expected.flatten()).abs().max().item()
    return f"sampling_offsets.bias differs from the grid (max diff {diff:.3g})"


def _layer_rules(prefix: str) -> list[tuple[str, Check]]:
    """Mask2Former's SelfAttentionLayer / CrossAttentionLayer / FFNLayer under ``prefix``."""
    attn = rf"{prefix}transformer_(self|cross)_attention_layers\.\d+\.(self_attn|multihead_attn)\."
    ffn = rf"{prefix}transformer_ffn_layers\.\d+\."
    layer = rf"{prefix}transformer_(self_attention|cross_attention|ffn)_layers\.\d+\."
    return [
        # _reset_parameters of the Mask2Former layers: xavier on every matrix.
        (attn + r"(in_proj_weight|out_proj\.weight)", xavier),
        (ffn + r"linear[12]\.weight", xavier),
        # nn.MultiheadAttention zeroes its biases; the reset leaves 1-dim parameters alone.
        (attn + r"(in_proj_bias|out_proj\.bias)", zeros),
        (ffn + r"linear[12]\.bias", torch_default_bias),
        (layer + r"norm\.weight", ones),
        (layer + r"norm\.bias", zeros),
    ]


MM_RULES: list[tuple[str, Check]] = [
    # The reference's 1x1 reductions and matching MLP keep PyTorch's defaults.
    (r"conv_\d\.weight", torch_default_weight),
    *_layer_rules(r"crossat_\d\."),
    (r"fc[12]\.weight", torch_default_weight),
    (r"fc[12]\.bias", torch_default_bias),
]

ENC = r"pixel_decoder\.transformer\.encoder\.layers\.\d+\."
POS_RULES: list[tuple[str, Check]] = [
    (r"pixel_decoder\.input_proj\.\d\.0\.weight", xavier),
    (r"pixel_decoder\.input_proj\.\d\.0\.bias", zeros),
    (r"pixel_decoder\.input_proj\.\d\.1\.weight", ones),  # GroupNorm
    (r"pixel_decoder\.input_proj\.\d\.1\.bias", zeros),
    (r"pixel_decoder\.transformer\.level_embed", normal),
    (ENC + r"self_attn\.sampling_offsets\.weight", zeros),
    (ENC + r"self_attn\.sampling_offsets\.bias", deform_grid),
    (ENC + r"self_attn\.attention_weights\.(weight|bias)", zeros),
    (ENC + r"self_attn\.(value_proj|output_proj)\.weight", xavier),
    (ENC + r"self_attn\.(value_proj|output_proj)\.bias", zeros),
    (ENC + r"linear[12]\.weight", xavier),
    (ENC + r"linear[12]\.bias", torch_default_bias),
    (ENC + r"norm[12]\.weight", ones),
    (ENC + r"norm[12]\.bias", zeros),
    (r"pixel_decoder\.mask_features\.weight", c2_xavier),
    (r"pixel_decoder\.mask_features\.bias", zeros),
    (r"pixel_decoder\.(adapter|layer)_\d\.weight", c2_xavier),
    (r"pixel_decoder\.(adapter|layer)_\d\.norm\.weight", ones),
    (r"pixel_decoder\.(adapter|layer)_\d\.norm\.bias", zeros),
    *_layer_rules(r"transformer_decoder\."),
    (r"transformer_decoder\.decoder_norm\.weight", ones),
    (r"transformer_decoder\.decoder_norm\.bias", zeros),
    (r"transformer_decoder\.(query_feat|query_embed|level_embed)\.weight", normal),  # nn.Embedding
    (r"transformer_decoder\.input_proj\.\d\.weight", c2_xavier),  # only when in_channels != hidden_dim
    (r"transformer_decoder\.input_proj\.\d\.bias", zeros),
    (r"transformer_decoder\.mask_embed\.layers\.\d\.weight", torch_default_weight),
    (r"transformer_decoder\.mask_embed\.layers\.\d\.bias", torch_default_bias),
]

# Rules that only apply to configurations other than the paper's (no parameter to match there).
OPTIONAL_RULES = {
    r"transformer_decoder\.input_proj\.\d\.weight",
    r"transformer_decoder\.input_proj\.\d\.bias",
}


@pytest.fixture(scope="module")
def mm() -> MaskMatching:
    torch.manual_seed(SEED)
    return MaskMatching()


@pytest.fixture(scope="module")
def pos() -> PotentialObjectsSegmenter:
    torch.manual_seed(SEED)
    return PotentialObjectsSegmenter()


def _check_all(model: nn.Module, rules: list[tuple[str, Check]]) -> None:
    failures: list[str] = []
    used: set[str] = set()
    for name, p in model.named_parameters():
        rule = next(((pattern, check) for pattern, check in rules if re.fullmatch(pattern, name)), None)
        if rule is None:
            failures.append(f"{name}: no init rule covers this parameter")
            continue
        used.add(rule[0])
        problem = rule[1](model, name, p)
        if problem is not None:
            failures.append(f"{name}: {problem}")
    unused = [pattern for pattern, _ in rules if pattern not in used and pattern not in OPTIONAL_RULES]
    assert not unused, f"rules that match no parameter (stale?): {unused}"
    assert not failures, f"{len(failures)} parameters off the reference init:\n" + "\n".join(failures)


def test_mask_matching_init(mm: MaskMatching) -> None:
    _check_all(mm, MM_RULES)


def test_pos_init(pos: PotentialObjectsSegmenter) -> None:
    _check_all(pos, POS_RULES)


def test_decoder_input_proj_init_when_projecting() -> None:
    # The decoder's 1x1 input projections exist only when in_channels != hidden_dim (c2_xavier_fill there).
    torch.manual_seed(SEED)
    decoder = MaskedTransformerDecoder(in_channels=256, hidden_dim=64, dim_feedforward=128, dec_layers=1)
    projections = [(n, p) for n, p in decoder.named_parameters() if n.startswith("input_proj.")]
    assert len(projections) == 6
    for name, p in projections:
        check = c2_xavier if name.endswith("weight") else zeros
        assert check(decoder, name, p) is None, name


def test_encoder_layers_are_copies_then_reinitialised(pos: PotentialObjectsSegmenter) -> None:
    # Deformable DETR clones one encoder layer, then re-draws only the matrices: 1-dim parameters (FFN
    # biases, LayerNorms, deformable-attention biases) start identical in every layer, matrices do not.
    layers = pos.pixel_decoder.transformer.encoder.layers
    assert len(layers) == 6
    first = dict(layers[0].named_parameters())
    zero_matrices = {"self_attn.sampling_offsets.weight", "self_attn.attention_weights.weight"}
    for i, layer in enumerate(layers[1:], start=1):
        for name, p in layer.named_parameters():
            same = torch.equal(p, first[name])
            if p.dim() == 1:
                assert same, f"layers.{i}.{name} differs from layers.0.{name}"
            elif name not in zero_matrices:
                assert not same, f"layers.{i}.{name} is a copy of layers.0.{name}"
