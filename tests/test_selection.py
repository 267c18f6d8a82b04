"""Soft IoU, oracle / heuristic selection and the stride-4 -> image helper."""

from __future__ import annotations

from pathlib import Path

import torch

from fewshot_seg.models.selection import (
    oracle_select,
    proposal_soft_iou,
    selected_foreground,
    soft_iou,
    top_cosine_select,
    upsample_to_image,
)

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_oracle_select_golden() -> None:
    g = torch.load(GOLDEN / "oracle_select.pt", weights_only=True)
    probs = g["inputs"]["pred_masks"].sigmoid()
    label = g["inputs"]["label"].float()
    hw = tuple(g["config"]["image_hw"])
    plain = soft_iou(upsample_to_image(probs, hw), label)
    torch.testing.assert_close(plain, g["outputs"]["ious"], atol=1e-6, rtol=1e-5)
    index, ious = oracle_select(probs, label)
    torch.testing.assert_close(ious, g["outputs"]["ious"], atol=1e-6, rtol=1e-5)
    assert torch.equal(index, g["outputs"]["index"])
    fg = selected_foreground(probs, index, hw)
    torch.testing.assert_close(fg, g["outputs"]["few_shot_result"][:, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(1 - fg, g["outputs"]["few_shot_result"][:, 0], atol=1e-6, rtol=1e-5)


def test_adjoint_soft_iou_equals_explicit_on_padded_crop() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 12, 9, generator=gen)  # padded 48 x 36
    label = torch.randint(0, 2, (2, 41, 30), generator=gen).float()
    label[:, :5] = 255
    explicit = soft_iou(upsample_to_image(probs, (41, 30)), label)
    torch.testing.assert_close(proposal_soft_iou(probs, label), explicit, atol=1e-6, rtol=1e-5)
    assert not proposal_soft_iou(probs.requires_grad_(True), label).requires_grad


def test_soft_iou_ignore_and_empty() -> None:
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 1] = 1.0
    label = torch.full((1, 4, 4), 255.0)
    torch.testing.assert_close(soft_iou(probs, label), torch.zeros(1, 2))  # 255 -> background, no NaN
    label[0, :2] = 1
    torch.testing.assert_close(soft_iou(probs, label), torch.tensor([[0.0, 0.5]]))


def test_upsample_crop_and_top_cosine() -> None:
    maps = torch.arange(6.0).reshape(1, 1, 2, 3)
    out = upsample_to_image(maps, (7, 10))
    full = torch.nn.functional.interpolate(maps, size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(out, full[..., :7, :10])
    assert torch.equal(
        top_cosine_select(torch.tensor([[0.1, 0.9, -1.0], [0.5, 0.2, 0.7]])), torch.tensor([1, 2])
    )


def test_proposal_soft_iou_runs_under_inference_mode() -> None:
    # Lightning evaluates under inference_mode by default: the IoU must not rely on autograd.
    probs = torch.rand(2, 5, 9, 13)
    label = torch.randint(0, 2, (2, 33, 50))
    label[0, :3] = 255
    with torch.inference_mode():
        fast = proposal_soft_iou(probs, label)
    slow = soft_iou(upsample_to_image(probs, (33, 50)), label)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
