"""HungarianMatcher: golden costs and assignments, fp32 under autocast, no gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot_seg.models.matcher import HungarianMatcher

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN / "pos_criterion.pt", weights_only=True)


def _layers(g: dict) -> dict[str, torch.Tensor]:
    preds = [g["inputs"]["pred_masks_final"], *g["inputs"]["pred_masks_aux"]]
    return dict(zip(g["outputs"]["layer_order"], preds))


def test_matcher_golden_costs_and_indices(golden: dict) -> None:
    cfg = golden["config"]["matcher"]
    matcher = HungarianMatcher(cfg["cost_mask"], cfg["cost_dice"], cfg["num_points"])
    targets = golden["inputs"]["gt_masks"]
    for layer, pred in _layers(golden).items():
        ref = golden["outputs"]["per_layer"][layer]
        coords = ref["matcher_point_coords"]
        for b, tgt in enumerate(targets):
            cost_mask, cost_dice, total = matcher.costs(pred[b], tgt.bool(), coords[b])
            torch.testing.assert_close(cost_mask, ref["cost_mask"][b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cost_dice, ref["cost_dice"][b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(total, ref["C"][b], atol=1e-4, rtol=1e-5)
        indices = matcher(pred, [t.bool() for t in targets], coords)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            assert pred_idx.dtype == torch.int64
            assert torch.equal(pred_idx, ref["indices"][b]["pred"]), (layer, b)
            assert torch.equal(tgt_idx, ref["indices"][b]["tgt"]), (layer, b)


def test_matcher_draws_one_point_set_per_image_in_order(golden: dict) -> None:
    # Seeded global RNG -> the points the reference drew for the final layer (image 0, then image 1).
    matcher = HungarianMatcher(num_points=golden["config"]["matcher"]["num_points"])
    pred = golden["inputs"]["pred_masks_final"]
    ref = golden["outputs"]["per_layer"]["final"]
    torch.manual_seed(golden["inputs"]["rng_seed_before_forward"])
    indices = matcher(pred, [t.bool() for t in golden["inputs"]["gt_masks"]])
    for b, (pred_idx, _) in enumerate(indices):
        assert torch.equal(pred_idx, ref["indices"][b]["pred"])


def test_matcher_fp32_under_bf16_autocast_and_no_grad() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 8, 8, generator=gen, requires_grad=True)
    targets = [torch.rand(3, 32, 32, generator=gen) > 0.5, torch.rand(0, 32, 32, generator=gen) > 0.5]
    coords = torch.rand(2, 40, 2, generator=gen)
    matcher = HungarianMatcher(num_points=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = matcher.costs(pred[0].bfloat16(), targets[0], coords[0])
        indices = matcher(pred.bfloat16(), targets, coords)
    assert all(c.dtype == torch.float32 and not c.requires_grad for c in costs)
    ref = matcher.costs(pred[0].detach().bfloat16().float(), targets[0], coords[0])
    for ours, expected in zip(costs, ref):
        torch.testing.assert_close(ours, expected)
    assert len(indices[0][0]) == 3 and len(indices[1][0]) == 0
