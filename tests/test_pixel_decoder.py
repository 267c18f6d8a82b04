"""MSDeformAttnPixelDecoder: golden parity (through the converter), fp32 under autocast, shapes."""

from pathlib import Path

import pytest
import torch

from fewshot_seg.models import ms_deform_attn as msda
from fewshot_seg.models.convert import CheckpointMismatchError, load_reference_module
from fewshot_seg.models.pixel_decoder import MSDeformAttnPixelDecoder, MSDeformAttnTransformerEncoderOnly

GOLDEN = torch.load(
    Path(__file__).parent / "data" / "golden" / "msdeform_pixel_decoder.pt", weights_only=True
)


def _golden_decoder() -> MSDeformAttnPixelDecoder:
    cfg = GOLDEN["config"]
    decoder = MSDeformAttnPixelDecoder(
        input_channels={k: v["channels"] for k, v in cfg["input_shape"].items()},
        conv_dim=cfg["conv_dim"],
        mask_dim=cfg["mask_dim"],
        num_heads=cfg["transformer_nheads"],
        num_encoder_layers=cfg["transformer_enc_layers"],
        dim_feedforward=cfg["transformer_dim_feedforward"],
        num_points=4,
    )
    report = load_reference_module(decoder, GOLDEN["state_dict"], "pixel_decoder")
    assert len(report.loaded) == len(GOLDEN["state_dict"]) and report.ok
    return decoder.eval()


def test_golden_outputs_and_intermediates(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = _golden_decoder()
    core_inputs = []
    core = msda.ms_deform_attn_core

    def spy(value, shapes, loc, weights, impl=None):
        core_inputs.append((loc, weights))
        return core(value, shapes, loc, weights, impl=impl)

    monkeypatch.setattr(msda, "ms_deform_attn_core", spy)
    layer0 = []
    decoder.transformer.encoder.layers[0].register_forward_hook(lambda m, i, o: layer0.append(o))
    with torch.no_grad():
        mask_features, multi_scale = decoder(GOLDEN["inputs"]["features"])

    out, inter = GOLDEN["outputs"], GOLDEN["outputs"]["intermediates"]
    tol = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(mask_features, out["mask_features"], **tol)
    assert len(multi_scale) == 3
    for ours, ref in zip(multi_scale, out["multi_scale_features"]):
        torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(layer0[0], inter["encoder_layer0_out"], **tol)
    torch.testing.assert_close(core_inputs[0][0], inter["layer0_core"]["sampling_locations"], **tol)
    torch.testing.assert_close(core_inputs[0][1], inter["layer0_core"]["attention_weights"], **tol)
    shapes = [tuple(s) for s in inter["spatial_shapes"].tolist()]
    ref_points = MSDeformAttnTransformerEncoderOnly.reference_points(shapes, 2, torch.device("cpu"))
    torch.testing.assert_close(ref_points, inter["reference_points"], atol=1e-6, rtol=0)


def test_runs_in_fp32_under_autocast() -> None:
    decoder = _golden_decoder()
    feats = {k: v.bfloat16() for k, v in GOLDEN["inputs"]["features"].items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, multi_scale = decoder(feats)
    assert mask_features.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in multi_scale)
    # fp32 compute on bf16-rounded inputs stays close to the fp32 reference.
    assert (mask_features - GOLDEN["outputs"]["mask_features"]).abs().max() < 0.2


def test_converter_skips_unused_crossat_and_rejects_unknown() -> None:
    decoder = MSDeformAttnPixelDecoder(
        {"res2": 16, "res3": 24, "res4": 32, "res5": 48},
        conv_dim=64,
        mask_dim=64,
        num_heads=4,
        num_encoder_layers=2,
        dim_feedforward=128,
    )
    state = dict(GOLDEN["state_dict"])
    state["crossat_4x.transformer_ffn_layers.0.linear1.weight"] = torch.zeros(3)
    report = load_reference_module(decoder, state, "pixel_decoder")
    assert report.skipped == ["crossat_4x.transformer_ffn_layers.0.linear1.weight"]
    state["transformer.encoder.layers.7.norm1.weight"] = torch.zeros(64)
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.encoder\.layers\.7\.norm1\.weight"):
        load_reference_module(decoder, state, "pixel_decoder")


def test_shapes_non_square() -> None:
    decoder = MSDeformAttnPixelDecoder(
        {"res2": 8, "res3": 8, "res4": 8, "res5": 8},
        conv_dim=32,
        mask_dim=16,
        num_heads=2,
        num_encoder_layers=1,
        dim_feedforward=32,
    )
    feats = {f"res{i}": torch.randn(3, 8, 96 // 2**i, 160 // 2**i) for i in range(2, 6)}
    mask_features, multi_scale = decoder(feats)
    assert mask_features.shape == (3, 16, 24, 40)
    assert [tuple(m.shape) for m in multi_scale] == [(3, 32, 3, 5), (3, 32, 6, 10), (3, 32, 12, 20)]
