"""PotentialObjectsSegmenter: paper parameter count, shapes, mixed precision."""

import time

import pytest
import torch

from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.pos import PotentialObjectsSegmenter

R18 = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}


def _small_pos(**kwargs) -> PotentialObjectsSegmenter:
    cfg = dict(
        in_channels=R18,
        conv_dim=32,
        mask_dim=16,
        hidden_dim=32,
        num_queries=7,
        enc_layers=1,
        enc_heads=2,
        enc_ffn=32,
        enc_points=2,
        dec_layers=3,
        dec_heads=2,
        dec_ffn=32,
    )
    cfg.update(kwargs)
    return PotentialObjectsSegmenter(**cfg)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_count() -> None:
    pos = PotentialObjectsSegmenter()
    for module, reference in (
        (pos, 20.49e6),
        (pos.pixel_decoder, 6.04e6),
        (pos.transformer_decoder, 14.46e6),
    ):
        assert abs(_count(module) - reference) / reference < 0.01
    # Exact element counts of the reference modules (mmformer_state_dict_keys.txt, unused crossat_* excluded).
    assert _count(pos.pixel_decoder) == 6_035_904
    assert _count(pos.transformer_decoder) == 14_458_624


@pytest.mark.parametrize(("batch", "size"), [(1, (75, 130)), (4, (64, 40))])
def test_small_config_shapes(batch: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", weights=None).eval()
    pos = _small_pos()
    feats = backbone(torch.randn(batch, 3, *size))
    out = pos(feats)
    hp, wp = (-(-s // 32) * 32 for s in size)
    assert out["pred_masks"].shape == (batch, 7, hp // 4, wp // 4)
    assert len(out["aux_outputs"]) == 3
    assert all(a["pred_masks"].shape == out["pred_masks"].shape for a in out["aux_outputs"])
    loss = out["pred_masks"].mean() + sum(a["pred_masks"].mean() for a in out["aux_outputs"])
    loss.backward()
    assert pos.pixel_decoder.input_proj[0][0].weight.grad is not None
    assert pos.transformer_decoder.query_feat.weight.grad is not None


def test_hidden_dim_differs_from_conv_dim() -> None:
    pos = _small_pos(hidden_dim=64)
    feats = {f"res{i}": torch.randn(1, R18[f"res{i}"], 64 // 2**i, 96 // 2**i) for i in range(2, 6)}
    assert pos(feats)["pred_masks"].shape == (1, 7, 16, 24)


def test_full_size_forward_small_image() -> None:
    torch.manual_seed(0)
    pos = PotentialObjectsSegmenter().eval()
    feats = {f"res{i}": torch.randn(1, 64 * 2**i, 64 // 2**i, 96 // 2**i) for i in range(2, 6)}
    start = time.perf_counter()
    with torch.no_grad():
        out = pos(feats)
    assert time.perf_counter() - start < 10
    assert out["pred_masks"].shape == (1, 100, 16, 24) and len(out["aux_outputs"]) == 9
    assert torch.isfinite(out["pred_masks"]).all()


def test_autocast_bf16_finite_and_pixel_decoder_fp32() -> None:
    torch.manual_seed(0)
    pos = _small_pos().eval()
    feats = {f"res{i}": torch.randn(2, R18[f"res{i}"], 96 // 2**i, 64 // 2**i) for i in range(2, 6)}
    dtypes = []
    pos.pixel_decoder.register_forward_hook(
        lambda m, i, o: dtypes.append((o[0].dtype, [t.dtype for t in o[1]]))
    )
    attn_dtypes = []
    pos.pixel_decoder.transformer.encoder.layers[0].self_attn.register_forward_hook(
        lambda m, i, o: attn_dtypes.append(o.dtype)
    )
    with torch.no_grad():
        reference = pos(feats)["pred_masks"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pos({k: v.bfloat16() for k, v in feats.items()})
    assert dtypes[-1] == (torch.float32, [torch.float32] * 3)
    assert attn_dtypes[-1] == torch.float32
    assert torch.isfinite(out["pred_masks"].float()).all()
    assert all(torch.isfinite(a["pred_masks"].float()).all() for a in out["aux_outputs"])
    # bf16 decoder on top of the fp32 pixel decoder stays close to the fp32 result.
    assert (out["pred_masks"].float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1
