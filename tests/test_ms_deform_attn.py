"""Multi-scale deformable attention: golden core parity of every implementation, agreement between them
(outputs and all three gradients), implementation choice, module behaviour, fp32."""

from pathlib import Path

import pytest
import torch

from fewshot_seg.models import ms_deform_attn as msda
from fewshot_seg.models.ms_deform_attn import (
    IMPL_ENV,
    IMPLEMENTATIONS,
    MSDeformAttn,
    default_impl,
    ms_deform_attn_core,
    ms_deform_attn_core_gather,
)

GOLDEN_PATH = Path(__file__).parent / "data" / "golden" / "msdeform_attn_core.pt"


def _random_inputs(n=2, m=3, d=4, lq=7, shapes=((5, 6), (3, 2), (1, 4)), p=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2  # some points outside [0, 1]
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    return value.to(device), torch.tensor(shapes).to(device), loc.to(device), weights.to(device)


def _with_grads(impl: str, value, shapes, loc, weights, upstream=None):
    """Output and gradients w.r.t. (value, locations, weights) of ``sum(out * upstream)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn_core(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
    if upstream is None:  # a non-uniform upstream gradient, so that every output element matters
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_core_matches_golden_output_and_grads(impl: str) -> None:
    data = torch.load(GOLDEN_PATH, weights_only=True)
    inp = data["inputs"]
    out, *grads = _with_grads(
        impl,
        inp["value"],
        inp["spatial_shapes"],
        inp["sampling_locations"],
        inp["attention_weights"],
        data["grads"]["upstream"],
    )
    torch.testing.assert_close(out, data["outputs"]["output"], atol=1e-5, rtol=1e-4)
    for grad, name in zip(grads, ("value", "sampling_locations", "attention_weights")):
        torch.testing.assert_close(grad, data["grads"][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    ("n", "shapes", "p", "seed"),
    [
        (2, ((5, 6), (3, 2), (1, 4)), 3, 0),  # non-square levels, a 1-row level
        (3, ((7, 3), (4, 9)), 2, 1),
        (1, ((6, 6),), 4, 2),
    ],
)
def test_all_implementations_agree(n, shapes, p, seed) -> None:
    # Locations in [-0.2, 1.2]: points outside the image, partly outside, and inside, on every level.
    value, shapes_t, loc, weights = _random_inputs(n=n, shapes=shapes, p=p, seed=seed)
    results = {impl: _with_grads(impl, value, shapes_t, loc, weights) for impl in IMPLEMENTATIONS}
    ref = results["loop"]
    assert ref[0].shape == (n, 7, 3 * 4)
    for impl, res in results.items():
        for got, want, name in zip(res, ref, ("output", "value", "locations", "weights")):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{impl}: {name}")


def test_gather_gradcheck_float64() -> None:
    value, shapes, loc, weights = _random_inputs(n=2, m=2, d=3, lq=4, shapes=((3, 4), (2, 1)), p=2, seed=3)
    args = [t.double().requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(
        lambda v, sl, aw: ms_deform_attn_core_gather(v, shapes, sl, aw), args, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_far_outside_and_nonfinite_locations_read_zeros(impl: str) -> None:
    value, shapes, loc, weights = _random_inputs(n=1, lq=3)
    loc[0, 0] = -5.0  # far outside every level
    loc[0, 1] = 1e4
    out, _, grad_loc, grad_w = _with_grads(impl, value, shapes, loc, weights)
    assert out[0, :2].abs().max() == 0
    assert grad_loc[0, :2].abs().max() == 0 and grad_w[0, :2].abs().max() == 0
    assert out[0, 2].abs().max() > 0
    if impl == "gather":  # NaN/inf locations must not index outside the table (nor touch other queries)
        loc[0, 0, 0, 0, 0] = float("nan")
        loc[0, 1, 0, 0, 0] = float("inf")
        out_nonfinite = ms_deform_attn_core_gather(value, shapes, loc, weights)
        torch.testing.assert_close(out_nonfinite[0, 2], out[0, 2])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_core_samples_pixel_centres_exactly(impl: str) -> None:
    # A location at the centre of pixel (i, j) must return exactly that pixel (align_corners=False).
    value = torch.arange(12.0).view(1, 12, 1, 1)  # one level 3x4, one head, D=1
    loc = torch.tensor([[(2 + 0.5) / 4, (1 + 0.5) / 3]]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1), impl=impl)
    assert out.item() == pytest.approx(1 * 4 + 2)
    # Half a pixel beyond the last centre: half of the border pixel, half zero padding.
    loc = torch.tensor([[1.0, (1 + 0.5) / 3]]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1), impl=impl)
    assert out.item() == pytest.approx(0.5 * 7)


def test_implementation_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_seg.config import POSConfig
    from fewshot_seg.models.build import build_pos
    from fewshot_seg.models.ms_deform_attn import MSDeformAttn

    def impls(pos: torch.nn.Module) -> set:
        return {m.impl for m in pos.modules() if isinstance(m, MSDeformAttn)}

    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert default_impl(torch.device("cpu")) == "gather"
    assert default_impl(torch.device("cuda")) == "gather"  # measured faster for training (docs/gpu.md)
    channels = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}
    small = {
        "dim": 32,
        "heads": 2,
        "enc_layers": 2,
        "enc_ffn": 32,
        "dec_layers": 1,
        "dec_ffn": 32,
        "norm_groups": 8,
    }
    assert impls(build_pos(POSConfig(**small), channels)) == {None}  # by device, at each call
    assert impls(build_pos(POSConfig(**small, deform_attn="loop"), channels)) == {"loop"}  # a model setting
    monkeypatch.setenv(IMPL_ENV, "grid_sample")  # the override, read when a module is built
    assert impls(build_pos(POSConfig(**small, deform_attn="loop"), channels)) == {"grid_sample"}
    assert default_impl(torch.device("cpu")) == "gather"  # no longer read on every call
    monkeypatch.setenv(IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=IMPL_ENV):
        MSDeformAttn(32, 3, 2, 4)
    value, shapes, loc, weights = _random_inputs()
    with pytest.raises(ValueError, match="unknown implementation"):
        ms_deform_attn_core(value, shapes, loc, weights, impl="fast")


def test_gather_keeps_half_precision_dtype_and_runs_under_autocast() -> None:
    value, shapes, loc, weights = _random_inputs()
    ref = ms_deform_attn_core_gather(value, shapes, loc, weights)
    out = ms_deform_attn_core_gather(value.bfloat16(), shapes, loc, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    leaf = value.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_core_gather(leaf, shapes, loc, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.float32


def test_module_init_and_shapes() -> None:
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # Head 0 looks along +x, point k at distance k+1, on every level.
    torch.testing.assert_close(bias[0, :, 0], torch.tensor([[1.0, 0.0]] * 3))
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[2.0, 0.0]] * 3))
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = [(4, 5), (2, 3), (1, 2)]
    s = sum(h * w for h, w in shapes)
    query, src = torch.randn(2, 6, 32), torch.randn(2, s, 32)
    ref = torch.rand(2, 6, 3, 2)
    out = attn(query, ref, src, shapes)
    assert out.shape == (2, 6, 32)
    with pytest.raises(ValueError):
        attn(query, ref, src[:, :-1], shapes)


def test_padding_mask_removes_values() -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
    query, ref, src = torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2), torch.randn(1, 6, 8)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[:, 3:] = True
    other = src.clone()
    other[:, 3:] = torch.randn(1, 3, 8)  # changing masked tokens must not change the output
    out = attn(query, ref, src, [(2, 3)], mask)
    torch.testing.assert_close(out, attn(query, ref, other, [(2, 3)], mask))
    assert not torch.allclose(attn(query, ref, src, [(2, 3)]), attn(query, ref, other, [(2, 3)]))


def test_runs_in_fp32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    core = msda.ms_deform_attn_core

    def spy(value, shapes, loc, weights, impl=None):
        seen.append((value.dtype, loc.dtype, weights.dtype))
        return core(value, shapes, loc, weights, impl=impl)

    monkeypatch.setattr(msda, "ms_deform_attn_core", spy)
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 3, 16).bfloat16(), torch.rand(1, 3, 1, 2), torch.randn(1, 6, 16), [(2, 3)])
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [None, *IMPLEMENTATIONS])
def test_core_on_gpu_matches_cpu(impl: str | None) -> None:
    value, shapes, loc, weights = _random_inputs()
    cpu = _with_grads("loop", value, shapes, loc, weights)
    gpu = _with_grads(impl, value.cuda(), shapes.cuda(), loc.cuda(), weights.cuda(), _gpu_upstream(cpu[0]))
    for got, want in zip(gpu, cpu):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)


def _gpu_upstream(out: torch.Tensor) -> torch.Tensor:
    """The upstream gradient :func:`_with_grads` draws for ``out``, on the GPU."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).cuda()
