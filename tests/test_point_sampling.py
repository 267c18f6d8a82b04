"""point_sample convention and PointRend importance sampling (golden draws reproduced)."""

from __future__ import annotations

from pathlib import Path

import torch

from fewshot_seg.models.point_sampling import get_uncertain_point_coords_with_randomness, point_sample

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_point_sample_pixel_centres_and_zero_padding() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    # Pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H).
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [2.0 / 4, 0.5 / 3]]])
    out = point_sample(x, coords)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 11.0, 1.5]))
    # Outside the centres bilinear weights fall on zero padding.
    corner = point_sample(torch.ones(1, 1, 3, 4), torch.zeros(1, 1, 2))
    torch.testing.assert_close(corner[0, 0], torch.tensor([0.25]))


def test_importance_sampling_reproduces_golden_from_draws() -> None:
    g = torch.load(GOLDEN / "pos_criterion.pt", weights_only=True)
    p = g["config"]["criterion"]["num_points"]
    ref = g["outputs"]["per_layer"]["final"]
    pred = g["inputs"]["pred_masks_final"]
    src = torch.cat([pred[b, ref["indices"][b]["pred"]] for b in range(2)])[:, None]
    coords = get_uncertain_point_coords_with_randomness(
        src,
        p,
        3.0,
        0.75,
        oversampled_coords=ref["loss_oversampled_coords"],
        random_perm=ref["loss_random_perm"],
    )
    assert torch.equal(coords, ref["loss_point_coords"])


def test_importance_sampling_prefers_uncertain_points() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 10, 10, generator=gen) * 5
    coords = get_uncertain_point_coords_with_randomness(logits, 40, 3.0, 0.75, generator=gen)
    assert coords.shape == (3, 40, 2)
    unc = -point_sample(logits, coords)[:, 0].abs()
    # The first 30 points are the most uncertain of the 120 candidates: none less uncertain than the rest.
    assert (unc[:, :30].min(1).values >= unc[:, 30:].max(1).values).all()
    empty = get_uncertain_point_coords_with_randomness(logits[:0], 40, generator=gen)
    assert empty.shape == (0, 40, 2)
