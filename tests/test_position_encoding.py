"""PositionEmbeddingSine against the reference golden vectors."""

from pathlib import Path

import pytest
import torch

from fewshot_seg.models.position_encoding import PositionEmbeddingSine

GOLDEN = torch.load(Path(__file__).parent / "data" / "golden" / "pos_embed_sine.pt", weights_only=True)


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_golden_cases(case: str) -> None:
    data = GOLDEN["cases"][case]
    cfg = {**GOLDEN["config"], **data.get("config", {})}
    pe = PositionEmbeddingSine(cfg["num_pos_feats"], cfg["temperature"], cfg["normalize"], cfg["scale"])
    out = pe(torch.zeros(data["inputs"]["x_shape"]), data["inputs"]["mask"])
    expected = data["outputs"]["pos"]
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out - expected).abs().max().item() < 1e-5


def test_fully_masked_row_is_finite_and_channel_layout() -> None:
    pe = PositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[:, :, -1] = True  # a fully padded column
    out = pe(torch.zeros(1, 3, 4, 5), mask)
    assert torch.isfinite(out).all()
    # First half encodes y: constant along a row; second half encodes x: constant along a column.
    assert torch.equal(out[0, :8, 1, 0], out[0, :8, 1, 3])
    assert torch.equal(out[0, 8:, 0, 2], out[0, 8:, 3, 2])
    assert not torch.equal(out[0, :8, 0, 0], out[0, :8, 1, 0])


def test_bf16_input_gives_fp32_encoding() -> None:
    out = PositionEmbeddingSine(4)(torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
