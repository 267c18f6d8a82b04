"""MaskedTransformerDecoder: golden parity (through the converter) incl. masks and per-layer outputs."""

from pathlib import Path

import torch

from fewshot_seg.models.convert import load_reference_module
from fewshot_seg.models.transformer_decoder import MaskedTransformerDecoder

GOLDEN = torch.load(
    Path(__file__).parent / "data" / "golden" / "masked_transformer_decoder.pt", weights_only=True
)
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _golden_decoder() -> MaskedTransformerDecoder:
    cfg = GOLDEN["config"]
    decoder = MaskedTransformerDecoder(
        in_channels=cfg["in_channels"],
        hidden_dim=cfg["hidden_dim"],
        num_queries=cfg["num_queries"],
        nheads=cfg["nheads"],
        dim_feedforward=cfg["dim_feedforward"],
        dec_layers=cfg["dec_layers"],
        mask_dim=cfg["mask_dim"],
    )
    report = load_reference_module(decoder, GOLDEN["state_dict"], "transformer_decoder")
    assert report.ok and len(report.loaded) == len(GOLDEN["state_dict"])
    return decoder


def test_golden_predictions_and_intermediates() -> None:
    decoder = _golden_decoder().train()  # the golden call was made in training mode (dropout is 0)
    layer_out, masks_used = [], []
    for layer in decoder.transformer_ffn_layers:
        layer.register_forward_hook(lambda m, i, o: layer_out.append(o))
    for layer in decoder.transformer_cross_attention_layers:
        layer.register_forward_pre_hook(
            lambda m, a, kw: masks_used.append(kw["memory_mask"]), with_kwargs=True
        )
    inputs, out = GOLDEN["inputs"], GOLDEN["outputs"]
    with torch.no_grad():
        pred = decoder(inputs["multi_scale_features"], inputs["mask_features"])

    torch.testing.assert_close(pred["pred_masks"], out["pred_masks"], **TOL)
    assert len(pred["aux_outputs"]) == len(out["aux_outputs"]) == 4
    for ours, ref in zip(pred["aux_outputs"], out["aux_outputs"]):
        torch.testing.assert_close(ours["pred_masks"], ref, **TOL)
    torch.testing.assert_close(pred["mask_embeds"], out["que_mask_embeds"], **TOL)
    torch.testing.assert_close(pred["decoder_output"], out["decoder_output"], **TOL)
    inter = out["intermediates"]
    for ours, ref in zip(layer_out, inter["layer_out"]):
        torch.testing.assert_close(ours, ref, **TOL)
    for i, ref in enumerate(inter["memory_mask_used"]):
        ours = masks_used[i]
        # One mask for all heads ([B, 1, L, S], broadcast by the attention; the reference repeats it).
        assert ours.shape == (2, 1, *ref.shape[1:]), i
        assert torch.equal(ours[:, 0], ref), i
    # The fully-masked-row fix is exercised (layer 0 and 3 had such rows before the fix).
    assert inter["attn_mask_raw"][0].all(-1).sum() == 6
    assert not masks_used[0].all(-1).any()


def test_eval_mode_is_identical_and_input_projection() -> None:
    decoder = _golden_decoder().eval()
    inputs = GOLDEN["inputs"]
    with torch.no_grad():
        pred = decoder(inputs["multi_scale_features"], inputs["mask_features"])
    torch.testing.assert_close(pred["pred_masks"], GOLDEN["outputs"]["pred_masks"], **TOL)
    assert all(isinstance(p, torch.nn.Identity) for p in decoder.input_proj)
    projected = MaskedTransformerDecoder(
        in_channels=16, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=32, dec_layers=2, mask_dim=8
    )
    assert all(isinstance(p, torch.nn.Conv2d) for p in projected.input_proj)
    feats = [torch.randn(1, 16, 2 * 2**i, 3 * 2**i) for i in range(3)]
    out = projected(feats, torch.randn(1, 8, 16, 24))
    assert out["pred_masks"].shape == (1, 5, 16, 24) and len(out["aux_outputs"]) == 2
