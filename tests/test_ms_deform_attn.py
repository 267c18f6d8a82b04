"""Multi-scale deformable attention: golden core parity, loop reference, module behaviour, fp32."""

from pathlib import Path

import pytest
import torch

from fewshot_seg.models import ms_deform_attn as msda
from fewshot_seg.models.ms_deform_attn import MSDeformAttn, ms_deform_attn_core, ms_deform_attn_core_loop

GOLDEN_PATH = Path(__file__).parent / "data" / "golden" / "msdeform_attn_core.pt"


def _random_inputs(n=2, m=3, d=4, lq=7, shapes=((5, 6), (3, 2), (1, 4)), p=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2  # some points outside [0, 1]
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    return value.to(device), torch.tensor(shapes).to(device), loc.to(device), weights.to(device)


def test_core_matches_golden_output_and_grads() -> None:
    data = torch.load(GOLDEN_PATH, weights_only=True)
    inp = data["inputs"]
    value = inp["value"].clone().requires_grad_()
    loc = inp["sampling_locations"].clone().requires_grad_()
    weights = inp["attention_weights"].clone().requires_grad_()
    out = ms_deform_attn_core(value, inp["spatial_shapes"], loc, weights)
    torch.testing.assert_close(out, data["outputs"]["output"], atol=1e-5, rtol=1e-4)
    (out * data["grads"]["upstream"]).sum().backward()
    for tensor, name in ((value, "value"), (loc, "sampling_locations"), (weights, "attention_weights")):
        torch.testing.assert_close(tensor.grad, data["grads"][name], atol=1e-4, rtol=1e-3, msg=name)


def test_loop_reference_matches_vectorised_core() -> None:
    value, shapes, loc, weights = _random_inputs()
    fast = ms_deform_attn_core(value, shapes, loc, weights)
    slow = ms_deform_attn_core_loop(value, [tuple(s) for s in shapes.tolist()], loc, weights)
    assert fast.shape == (2, 7, 12)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_core_samples_pixel_centres_exactly() -> None:
    # A location at the centre of pixel (i, j) must return exactly that pixel (align_corners=False).
    value = torch.arange(12.0).view(1, 12, 1, 1)  # one level 3x4, one head, D=1
    loc = torch.tensor([[(2 + 0.5) / 4, (1 + 0.5) / 3]]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(1 * 4 + 2)


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

    def spy(value, shapes, loc, weights):
        seen.append((value.dtype, loc.dtype, weights.dtype))
        return core(value, shapes, loc, weights)

    monkeypatch.setattr(msda, "ms_deform_attn_core", spy)
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 3, 16).bfloat16(), torch.rand(1, 3, 1, 2), torch.randn(1, 6, 16), [(2, 3)])
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32, torch.float32)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_core_on_gpu_matches_cpu() -> None:
    value, shapes, loc, weights = _random_inputs()
    cpu = ms_deform_attn_core(value, shapes, loc, weights)
    gpu = ms_deform_attn_core(value.cuda(), shapes.cuda(), loc.cuda(), weights.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
