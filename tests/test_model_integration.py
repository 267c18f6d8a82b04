"""End-to-end model checks with small configurations: backbone -> POS -> Mask Matching and both losses.

Gradient flow of the two training stages, shapes for K-shot episodes at awkward image sizes, finite outputs
on degenerate labels, and bf16 autocast. Random weights (resnet18, ``weights=None``) and tiny heads keep the
whole file to a few seconds on one CPU thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from fewshot_seg.models.backbone import ResNetBackbone, build_backbone
from fewshot_seg.models.criterion import MaskMatchingCriterion, POSCriterion, semantic_to_targets
from fewshot_seg.models.freezing import freeze
from fewshot_seg.models.mask_matching import MaskMatching
from fewshot_seg.models.pos import PotentialObjectsSegmenter

R18 = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
NUM_QUERIES = 6
IMAGE_HW = (100, 140)  # non-square, not a multiple of 32 (padded to 128 x 160)


class Models(nn.Module):
    """The three parts of MM-Former in small sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone: ResNetBackbone = freeze(build_backbone("resnet18", weights=None))
        self.pos = PotentialObjectsSegmenter(
            in_channels=R18,
            conv_dim=32,
            mask_dim=16,
            hidden_dim=32,
            num_queries=NUM_QUERIES,
            enc_layers=1,
            enc_heads=2,
            enc_ffn=32,
            enc_points=2,
            dec_layers=2,
            dec_heads=2,
            dec_ffn=32,
        )
        self.mm = MaskMatching(
            in_channels=(512, 256, 128),
            hidden_dim=32,
            nhead=2,
            dim_feedforward=32,
            num_layers=1,
            num_proposals=NUM_QUERIES,
            matching_hidden=16,
        )


@pytest.fixture(scope="module")
def models() -> Models:
    torch.manual_seed(0)
    return Models()


def _images(batch: int, hw: tuple[int, int] = IMAGE_HW, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def _labels(batch: int, hw: tuple[int, int] = IMAGE_HW, seed: int = 1) -> Tensor:
    """``[B, H, W]`` in {0, 1, 255}: a foreground box, some ignore pixels, background elsewhere."""
    label = torch.zeros(batch, *hw, dtype=torch.long)
    label[:, hw[0] // 4 : hw[0] // 2, hw[1] // 3 : hw[1] // 2 + seed] = 1
    label[:, -3:, :] = 255
    return label


def _pos_criterion() -> POSCriterion:
    return POSCriterion(num_points=64)  # few points: the loss, not PointRend's accuracy, is under test


def _stage1_losses(
    models: Models, images: Tensor, semantic: Tensor, fewshot_label: Tensor, pos: nn.Module | None = None
) -> dict[str, Tensor]:
    """Stage-1 losses of ``pos`` (default ``models.pos``); semantic map and label ``[B, H, W]``."""
    with torch.no_grad():  # the backbone is frozen (SPEC §2)
        feats = models.backbone(images)
    targets = [semantic_to_targets(s) for s in semantic]
    return _pos_criterion()((models.pos if pos is None else pos)(feats), targets, fewshot_label)


def _stage2_out(
    models: Models, query: Tensor, supports: list[Tensor], support_masks: Tensor
) -> dict[str, Tensor | dict]:
    """Mask Matching output with the frozen part (backbone + POS) run under no_grad, as in stage 2."""
    with torch.no_grad():
        q_feats = models.backbone(query)
        logits = models.pos(q_feats)["pred_masks"]
        s_feats = [models.backbone(s) for s in supports]
    return models.mm(q_feats, s_feats, support_masks, logits, image_size=tuple(query.shape[-2:]))


def _zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _grads(module: nn.Module) -> dict[str, Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


def _assert_no_grad(module: nn.Module) -> None:
    for name, g in _grads(module).items():
        assert g is None or not g.any(), f"{name} received a gradient"


def _assert_all_trained(module: nn.Module, zero_at_init: tuple[str, ...] = ()) -> None:
    """Every parameter has a finite gradient, non-zero except the names in ``zero_at_init``."""
    grads = _grads(module)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    missing = [name for name, g in grads.items() if not g.any() and name not in zero_at_init]
    assert not missing, f"parameters without gradient: {missing}"


def test_stage1_loss_reaches_only_pos(models: Models) -> None:
    for part in (models.backbone, models.pos, models.mm):
        _zero_grads(part)
    semantic = _labels(2)
    semantic[:, :10, :20] = 2  # a second object class besides background and class 1
    losses = _stage1_losses(models, _images(2), semantic, (semantic == 1).long())
    assert {"loss_mask", "loss_dice", "loss_fewshot", "loss_mask_0", "loss_dice_1"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in models.backbone.parameters())
    # level_embed only enters the encoder queries, whose consumers (sampling_offsets, attention_weights)
    # are zero-initialised (Deformable DETR): its gradient is exactly 0 until they have trained a step.
    _assert_all_trained(models.pos, zero_at_init=("pixel_decoder.transformer.level_embed",))
    assert all(p.grad is None for p in models.mm.parameters())

    trained = copy.deepcopy(models.pos)
    _zero_grads(trained)
    with torch.no_grad():
        for layer in trained.pixel_decoder.transformer.encoder.layers:
            layer.self_attn.attention_weights.weight.normal_(std=0.1)
    sum(_stage1_losses(models, _images(2), semantic, (semantic == 1).long(), trained).values()).backward()
    _assert_all_trained(trained)


def test_stage2_loss_reaches_only_mask_matching(models: Models) -> None:
    for part in (models.backbone, models.pos, models.mm):
        _zero_grads(part)
    assert all(p.requires_grad for p in models.pos.parameters())  # no_grad alone must stop the gradient
    label = _labels(2)
    out = _stage2_out(models, _images(2), [_images(2, seed=5)], _labels(2, seed=7)[:, None])
    losses = MaskMatchingCriterion()(out, label)
    assert set(losses) == {"loss_dice", "loss_contrastive"}
    sum(losses.values()).backward()
    _assert_no_grad(models.backbone)
    _assert_no_grad(models.pos)
    _assert_all_trained(models.mm)


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("batch", [1, 4])
def test_shapes_through_the_whole_model(models: Models, batch: int, shot: int) -> None:
    support_hw = (76, 120)  # supports may differ in size from the query
    query = _images(batch)
    supports = [_images(batch, support_hw, seed=10 + i) for i in range(shot)]
    support_masks = torch.stack([_labels(batch, support_hw, seed=i) for i in range(shot)], 1)
    with torch.no_grad():
        feats = models.backbone(query)
        assert feats["res2"].shape == (batch, 64, 32, 40) and feats["res5"].shape == (batch, 512, 4, 5)
        pos_out = models.pos(feats)
        out = _stage2_out(models, query, supports, support_masks)
    assert pos_out["pred_masks"].shape == (batch, NUM_QUERIES, 32, 40)
    assert len(pos_out["aux_outputs"]) == 2
    assert out["foreground"].shape == (batch, *IMAGE_HW)
    assert out["similarity"].shape == out["coeff"].shape == (batch, NUM_QUERIES)
    assert out["proposals"].shape == (batch, NUM_QUERIES, 32, 40)
    for key in ("foreground", "similarity", "coeff", "proposals"):
        assert torch.isfinite(out[key]).all(), key


@pytest.mark.parametrize(
    "case", ["empty support mask", "query without target", "all-ignore query", "all-ignore support"]
)
def test_degenerate_labels_give_finite_outputs_and_losses(models: Models, case: str) -> None:
    batch = 2
    query_label, support_mask = _labels(batch), _labels(batch, seed=3)[:, None]
    if case == "empty support mask":
        support_mask = torch.zeros_like(support_mask)
    elif case == "query without target":
        query_label = torch.zeros_like(query_label)
    elif case == "all-ignore query":
        query_label = torch.full_like(query_label, 255)
    else:
        support_mask = torch.full_like(support_mask, 255)
    out = _stage2_out(models, _images(batch), [_images(batch, seed=4)], support_mask)
    for key in ("foreground", "similarity", "coeff"):
        assert torch.isfinite(out[key]).all(), key
    losses2 = MaskMatchingCriterion()(out, query_label)
    assert all(torch.isfinite(v) for v in losses2.values()), losses2
    sum(losses2.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in models.mm.parameters() if p.grad is not None)
    _zero_grads(models.mm)
    # Stage 1 on the same query label (used as semantic map too: no object at all / only ignore pixels).
    losses1 = _stage1_losses(models, _images(batch), query_label, query_label)
    assert all(torch.isfinite(v) for v in losses1.values()), losses1
    sum(losses1.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in models.pos.parameters() if p.grad is not None)
    _zero_grads(models.pos)


def test_both_stages_finite_under_bf16_autocast(models: Models) -> None:
    label = _labels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses1 = _stage1_losses(models, _images(2), label, label)
        out = _stage2_out(models, _images(2), [_images(2, seed=5)], _labels(2, seed=6)[:, None])
        losses2 = MaskMatchingCriterion()(out, label)
    for losses in (losses1, losses2):
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values()), losses
    (sum(losses1.values()) + sum(losses2.values())).backward()
    for part in (models.pos, models.mm):
        assert all(torch.isfinite(p.grad).all() for p in part.parameters() if p.grad is not None)
        _zero_grads(part)
