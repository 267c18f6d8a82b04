"""Mask Matching (stage 2): golden parity with the reference modules, shapes, parameter count, edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot_seg.models.criterion import MaskMatchingCriterion
from fewshot_seg.models.mask_matching import CrossAlignment, MaskMatching, SelfAlignment, kv_resize_hw

GOLDEN = Path(__file__).parent / "data" / "golden"
LEVELS = ("res5", "res4", "res3")
ATOL = 1e-4


def _golden(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def load_reference(module: torch.nn.Module, state_dict: dict, kind: str) -> None:
    """Load a reference state dict through the converter when it exists, else directly (names match)."""
    try:
        from fewshot_seg.models.convert import load_reference_module
    except ImportError:
        module.load_state_dict(state_dict, strict=True)
    else:
        load_reference_module(module, state_dict, kind)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float() - b.float()).abs().max().item()


# --- SelfAlignment
def test_self_alignment_golden_outputs_and_grads() -> None:
    g = _golden("self_align")
    sa = SelfAlignment()
    assert len(list(sa.parameters())) == 0
    for name, case in g["cases"].items():
        x = case["inputs"]["x"].clone().requires_grad_(True)
        y = sa(x)
        assert _maxdiff(y, case["outputs"]["y"]) <= 1e-5, name
        (y * case["grads"]["upstream"]).sum().backward()
        assert _maxdiff(x.grad, case["grads"]["x"]) <= ATOL, name


# --- CrossAlignment
def _cross_from_golden(g: dict) -> CrossAlignment:
    cfg = g["config"]
    block = CrossAlignment(cfg["hidden_dim"], cfg["nhead"], cfg["dim_feedforward"], cfg["num_layer"])
    load_reference(block, g["state_dict"], "cross_alignment")
    return block


@pytest.mark.parametrize(
    "case",
    [
        "downsample",
        "upsample",
        "no_resize_both_have_side_15",
        "query_has_side_15_support_not",
        "support_has_side_15_query_not",
    ],
)
def test_cross_alignment_golden(case: str) -> None:
    g = _golden("cross_align")
    block = _cross_from_golden(g)
    c = g["cases"][case]
    inp = {k: v.clone().requires_grad_(True) for k, v in c["inputs"].items() if torch.is_tensor(v)}
    kv_q, kv_s = block.kv_sizes(inp["out_que"].shape[-2:], inp["out_sup"].shape[-2:])
    assert list(kv_q) == list(c["config"]["kv_query_hw"])
    assert list(kv_s) == list(c["config"]["kv_support_hw"])
    que, sup = block(inp["out_que"], inp["out_sup"], inp["pos_que"], inp["pos_sup"])
    assert _maxdiff(que, c["outputs"]["que"]) <= ATOL
    assert _maxdiff(sup, c["outputs"]["sup"]) <= ATOL
    if "grads" in c:
        gr = c["grads"]
        ((que * gr["upstream_que"]).sum() + (sup * gr["upstream_sup"]).sum()).backward()
        for key in ("out_que", "out_sup", "pos_que", "pos_sup"):
            assert _maxdiff(inp[key].grad, gr["inputs"][key]) <= ATOL, key
        params = dict(block.named_parameters())
        assert set(params) == set(gr["params"])
        for key, ref in gr["params"].items():
            assert _maxdiff(params[key].grad, ref) <= ATOL, key


def test_kv_resize_rule_truncates_and_upsamples() -> None:
    assert kv_resize_hw((16, 17), 15) == (15, 15)
    assert kv_resize_hw((18, 16), 15) == (16, 15)
    assert kv_resize_hw((15, 8), 15) == (28, 15)
    assert kv_resize_hw((30, 40), 15) == (15, 20)


# --- MaskMatching
def _mm_from_golden(g: dict) -> MaskMatching:
    cfg = g["config"]
    ca = cfg["reduced_crossat"]
    mm = MaskMatching(
        in_channels=cfg["reduced_in_channels_res5_res4_res3"],
        hidden_dim=ca["hidden_dim"],
        nhead=ca["nhead"],
        dim_feedforward=ca["dim_feedforward"],
        num_layers=ca["num_layer"],
        num_proposals=cfg["num_queries"],
    )
    load_reference(mm, g["state_dict"], "mask_matching")
    return mm


def _mm_run(g: dict, shot: int, train: bool) -> tuple[MaskMatching, dict, dict, dict]:
    mm = _mm_from_golden(g)
    mm.train(train)
    inp = g["inputs"]
    out = mm(
        inp["query_feats"],
        inp["support_feats"][:shot],
        inp["support_label"][:, :shot].float(),
        inp["pos_mask_logits"],
        image_size=tuple(g["config"]["query_image_hw"]),
        return_intermediates=True,
    )
    losses, details = MaskMatchingCriterion().compute(out, inp["query_label"].float())
    return mm, out, losses, details


@pytest.mark.parametrize("shot", [1, 2])
def test_mask_matching_golden(shot: int) -> None:
    g = _golden("mm_head")
    ref = g["cases"][f"shot{shot}"]
    mm, out, losses, details = _mm_run(g, shot, train=True)
    ro, inter = ref["outputs"], out["intermediates"]
    ri = ro["intermediates"]

    # Forward: merged map, S, coeff, prototypes.
    assert _maxdiff(out["foreground"], ro["eval"]["few_shot_result"][:, 1]) <= ATOL
    assert _maxdiff(out["similarity"], ri["S"]) <= ATOL
    assert _maxdiff(out["coeff"], ri["coeff"]) <= ATOL
    assert _maxdiff(inter["proto_query"], ri["proto_que"]) <= ATOL
    assert _maxdiff(inter["proto_support"], ri["proto_sup"]) <= ATOL
    for k in range(shot):
        for lvl in LEVELS:
            assert (
                _maxdiff(inter["proto_support_per_level"][lvl][k], ri["proto_sup_per_level"][k][lvl]) <= ATOL
            )
            assert [list(x) for x in inter["kv_hw"][lvl]] == [list(x) for x in ri["crossat_kv_hw"][k][lvl]]
    if shot == 1:
        for lvl in LEVELS:
            assert _maxdiff(inter["self_align_query"][lvl], ri["self_align_out"]["query"][lvl]) <= ATOL
            assert (
                _maxdiff(inter["self_align_support"][lvl][0], ri["self_align_out"]["support"][0][lvl]) <= ATOL
            )
            assert _maxdiff(inter["reduced_query"][lvl], ri["reduced_feat_query"][lvl]) <= ATOL
            assert _maxdiff(inter["pos_query"][lvl], ri["pos_que"][lvl]) <= ATOL
            sup_in = ri["crossat_in_support"][0][lvl]
            assert _maxdiff(inter["support_masked"][lvl][0], sup_in["out_sup_masked"]) <= ATOL
            assert _maxdiff(inter["support_pos_masked"][lvl][0], sup_in["pos_sup_masked"]) <= ATOL
            assert _maxdiff(inter["cross_query"][lvl][0], ri["crossat_out"][0][lvl]["que"]) <= ATOL
            assert _maxdiff(inter["cross_support"][lvl][0], ri["crossat_out"][0][lvl]["sup"]) <= ATOL

    # Training losses and their pieces.
    rt = ro["train"]
    assert torch.equal(details["iou_argmin"], rt["iou_argmin"])
    assert torch.equal(details["iou_argmax"], rt["iou_argmax"])
    assert _maxdiff(details["ious"], rt["ious"]) <= 1e-5
    assert _maxdiff(details["co_em"], rt["co_em"]) <= ATOL
    assert _maxdiff(losses["loss_dice"], rt["fewshot_loss"]) <= ATOL
    assert _maxdiff(details["dice_unweighted"], rt["dice_unweighted"]) <= ATOL
    torch.testing.assert_close(losses["loss_contrastive"], rt["co_loss"], rtol=1e-3, atol=0)
    torch.testing.assert_close(details["bce_unweighted"], rt["co_bce_unweighted"], rtol=1e-3, atol=0)
    total = losses["loss_dice"] + losses["loss_contrastive"]
    torch.testing.assert_close(total, rt["total"], rtol=1e-3, atol=0)

    # Parameter gradients of the total (train mode).
    total.backward()
    params = dict(mm.named_parameters())
    assert set(params) == set(g["state_dict"])
    for key, ref_grad in ref["grads"]["params"].items():
        torch.testing.assert_close(params[key].grad, ref_grad, atol=ATOL, rtol=1e-3, msg=key)


def test_mask_matching_eval_equals_train_forward() -> None:
    g = _golden("mm_head")
    _, out_train, _, _ = _mm_run(g, 1, train=True)
    _, out_eval, _, _ = _mm_run(g, 1, train=False)
    assert torch.equal(out_train["foreground"], out_eval["foreground"])


def test_mask_matching_param_count_paper_config() -> None:
    mm = MaskMatching()
    n = sum(p.numel() for p in mm.parameters() if p.requires_grad)
    assert abs(n - 4.18e6) / 4.18e6 < 0.01
    assert n == 4_180_728  # sum of the reference per-module counts (conv_*, crossat_0/1/2, fc1, fc2)
    assert not any(k.startswith("crossat_3") for k in mm.state_dict())


def _small_mm(num_proposals: int = 7) -> MaskMatching:
    return MaskMatching(
        in_channels=(24, 16, 8),
        hidden_dim=16,
        nhead=4,
        dim_feedforward=32,
        num_proposals=num_proposals,
        matching_hidden=11,
    )


def _feats(b: int, hp: int, wp: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    chans = {"res5": 24, "res4": 16, "res3": 8}
    strides = {"res5": 32, "res4": 16, "res3": 8}
    return {k: torch.rand(b, c, hp // strides[k], wp // strides[k], generator=gen) for k, c in chans.items()}


@pytest.mark.parametrize(("b", "k"), [(1, 1), (4, 5), (2, 5)])
def test_mask_matching_shapes_non_square_unpadded(b: int, k: int) -> None:
    gen = torch.Generator().manual_seed(b * 10 + k)
    mm = _small_mm()
    h, w = 70, 100  # query not a multiple of 32 -> padded 96 x 128
    hs, ws = 90, 50  # support size different from the query -> padded 96 x 64
    q = _feats(b, 96, 128, gen)
    s = [_feats(b, 96, 64, gen) for _ in range(k)]
    masks = torch.randint(0, 2, (b, k, hs, ws), generator=gen).float()
    masks[:, :, :3] = 255
    logits = torch.randn(b, 7, 24, 32, generator=gen)
    out = mm(q, s, masks, logits, image_size=(h, w))
    assert out["foreground"].shape == (b, h, w)
    assert out["similarity"].shape == (b, 7)
    assert out["coeff"].shape == (b, 7)
    assert out["proposals"].shape == (b, 7, 24, 32)
    assert all(torch.isfinite(v).all() for v in out.values())
    # The merged map is the crop of the upsampled padded merge: independent of where the crop happens.
    full = mm(q, s, masks, logits, image_size=(96, 128))["foreground"]
    torch.testing.assert_close(full[:, :h, :w], out["foreground"])


def test_mask_matching_kshot_vectorisation_matches_per_shot_prototypes() -> None:
    gen = torch.Generator().manual_seed(3)
    mm = _small_mm()
    q = _feats(2, 64, 64, gen)
    s = [_feats(2, 64, 96, gen) for _ in range(3)]
    masks = torch.randint(0, 2, (2, 3, 64, 96), generator=gen).float()
    logits = torch.randn(2, 7, 16, 16, generator=gen)
    out = mm(q, s, masks, logits, image_size=(64, 64), return_intermediates=True)["intermediates"]
    singles = [mm(q, [s[i]], masks[:, i : i + 1], logits, (64, 64), True)["intermediates"] for i in range(3)]
    torch.testing.assert_close(
        out["proto_support"], torch.stack([x["proto_support"] for x in singles]).mean(0)
    )
    torch.testing.assert_close(out["proto_query"], torch.stack([x["proto_query"] for x in singles]).mean(0))


def test_mask_matching_edge_inputs_finite() -> None:
    gen = torch.Generator().manual_seed(0)
    mm = _small_mm()
    crit = MaskMatchingCriterion()
    q = _feats(2, 64, 64, gen)
    s = [_feats(2, 64, 64, gen)]
    logits = torch.randn(2, 7, 16, 16, generator=gen)
    logits[0, 0] = -200.0  # a fully underflowed proposal (sigmoid == 0 everywhere)
    cases = {
        "empty support": torch.zeros(2, 1, 64, 64),
        "ignore-only support": torch.full((2, 1, 64, 64), 255.0),
    }
    labels = {"no target": torch.zeros(2, 64, 64), "all 255": torch.full((2, 64, 64), 255.0)}
    for mname, masks in cases.items():
        out = mm(q, s, masks, logits, image_size=(64, 64))
        for key in ("foreground", "similarity", "coeff"):
            assert torch.isfinite(out[key]).all(), (mname, key)
        for lname, label in labels.items():
            losses = crit(out, label)
            total = sum(losses.values())
            assert torch.isfinite(total), (mname, lname)
            total.backward(retain_graph=True)
            assert all(torch.isfinite(p.grad).all() for p in mm.parameters() if p.grad is not None)
            mm.zero_grad()


def test_mask_matching_bf16_autocast_finite() -> None:
    gen = torch.Generator().manual_seed(1)
    mm = _small_mm()
    q = _feats(2, 64, 64, gen)
    s = [_feats(2, 64, 64, gen) for _ in range(2)]
    masks = torch.randint(0, 2, (2, 2, 64, 64), generator=gen).float()
    logits = torch.randn(2, 7, 16, 16, generator=gen)
    label = torch.randint(0, 2, (2, 64, 64), generator=gen).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mm(q, s, masks, logits, image_size=(64, 64))
        losses = MaskMatchingCriterion()(out, label)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
