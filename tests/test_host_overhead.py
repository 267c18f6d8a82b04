"""Host overhead of a training step (issue 25): host syncs, batched losses, caches and their numerics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from fewshot_seg.lightning.finite import MIN_LOSS_SCALE, NonFiniteError
from fewshot_seg.lightning.optim import adamw_implementation
from fewshot_seg.lightning.pos_module import POSModule
from fewshot_seg.models.criterion import semantic_to_targets
from fewshot_seg.models.frozen_bn import CachedFrozenBatchNorm2d
from fewshot_seg.models.matcher import HungarianMatcher
from fewshot_seg.models.position_encoding import PositionEmbeddingSine
from fewshot_seg.models.targets import PaddedTargets, label_values

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_overhead import count_training_step, episode_batch, fit_on

TINY = {
    "backbone": {"name": "resnet18", "weights": None, "freeze": False},
    "pos": {"num_queries": 6, "dim": 32, "heads": 4, "enc_layers": 1, "enc_ffn": 64, "dec_layers": 3,
            "dec_ffn": 64, "norm_groups": 8},
    "loss": {"num_points": 64},
    "optim": {"batch_size": 2, "max_steps": 10},
    "eval_class_ids": [1],
}  # fmt: skip


def _tiny_pos() -> POSModule:
    torch.manual_seed(0)
    return POSModule(**TINY)


def test_stage1_step_asks_for_at_most_two_host_syncs() -> None:
    counter = count_training_step(_tiny_pos(), episode_batch(2, 0, 64, 3), "cpu", "32-true")
    ours = {what: n for (_, what), n in counter.syncs.items() if not what.endswith("@ other")}
    assert sum(ours.values()) <= 2, ours
    assert counter.ops["losses"] > 0 and counter.ops["backward"] > 0


def test_padded_targets_equal_semantic_to_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    semantic = torch.randint(0, 6, (3, 20, 24), generator=gen, dtype=torch.uint8)
    semantic[0, :5] = 255
    semantic[2] = 255  # no target at all
    values = label_values(semantic)
    padded = PaddedTargets.from_semantic(semantic.long(), values)
    for b, s in enumerate(semantic):
        ref = semantic_to_targets(s)
        assert padded.counts[b] == ref["masks"].shape[0]
        assert tuple(ref["labels"].tolist()) == values[b]
        assert torch.equal(padded.masks[b, : padded.counts[b]], ref["masks"])
        assert not padded.masks[b, padded.counts[b] :].any()


def test_collated_batches_carry_the_label_values() -> None:
    batch = episode_batch(2, 0, 32, 3)
    assert batch.query_label_values == label_values(batch.query_semantic)
    assert batch.to("cpu").query_label_values == batch.query_label_values


def test_batched_matching_equals_the_per_image_matcher() -> None:
    gen = torch.Generator().manual_seed(1)
    layers, batch, queries = 3, 2, 7
    preds = torch.randn(layers, batch, queries, 8, 8, generator=gen)
    semantic = torch.randint(0, 4, (batch, 32, 32), generator=gen)
    targets = PaddedTargets.from_list([semantic_to_targets(s) for s in semantic])
    coords = torch.rand(layers, batch, 50, 2, generator=gen)
    matcher = HungarianMatcher(num_points=50)
    indices, flat, synced = matcher.match_layers(
        preds, targets.masks, targets.counts, coords, torch.ones(3, dtype=torch.bool)
    )
    assert synced is not None and synced.tolist() == [1.0, 1.0, 1.0]
    rows = []
    for li in range(layers):
        ref = matcher(preds[li], [targets.masks[b, : targets.counts[b]] for b in range(batch)], coords[li])
        for b, ((r0, c0), (r1, c1)) in enumerate(zip(ref, indices[li])):
            assert torch.equal(r0, r1) and torch.equal(c0, c1)
            rows += [(li * batch + b) * queries + r for r in r0.tolist()]
    assert flat[0].tolist() == rows


def test_batched_costs_have_the_per_image_matchers_bits() -> None:
    # A last-bit difference in a cost flips the assignment at a near-tie, and with it the whole training
    # run (the demo moved by 2 mIoU when the products ran over padded, batched targets). Images with 1, 2
    # and 3 targets and one without; Q x P a multiple of 64, as the demo's and the paper's sizes are.
    gen = torch.Generator().manual_seed(2)
    layers, queries, points = 3, 8, 64
    counts = [1, 3, 0, 2, 1, 3]
    preds = 3 * torch.randn(layers, len(counts), queries, 8, 8, generator=gen)
    targets = torch.zeros(len(counts), max(counts), 32, 32)
    for b, n in enumerate(counts):
        targets[b, :n] = (torch.rand(n, 32, 32, generator=gen) > 0.7).float()
    coords = torch.rand(layers, len(counts), points, 2, generator=gen)
    matcher = HungarianMatcher(num_points=points)
    cost = matcher.layer_costs(preds, targets, counts, coords)
    for li in range(layers):
        for b, n in enumerate(counts):
            ref = matcher.costs(preds[li, b], targets[b, :n], coords[li, b])[2]
            assert torch.equal(cost[li, b, :, :n], ref), (li, b, n)


def test_adamw_is_foreach_on_cpu_with_the_same_bits_and_fused_on_cuda() -> None:
    class Cuda:
        device = torch.device("cuda")

    assert adamw_implementation([Cuda()]) == {"fused": True}
    assert adamw_implementation([torch.zeros(1)]) == {"foreach": True}
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in ((16, 8), (8,), (3, 3, 4))]
    results = []
    for impl in ({"foreach": False}, adamw_implementation(start)):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **impl)
        grads = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_cached_frozen_batchnorm_equals_torchvision_and_follows_its_buffers() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(0)
    ref, cached = FrozenBatchNorm2d(5), CachedFrozenBatchNorm2d(5)
    state = {k: torch.rand(v.shape, generator=gen) + 0.5 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    cached.load_state_dict(state)
    x = torch.randn(2, 5, 4, 4, generator=gen)
    assert torch.equal(cached(x), ref(x)) and torch.equal(cached(x), ref(x))
    state["weight"] = state["weight"] * 2  # written in place by load_state_dict: the cache is refreshed
    ref.load_state_dict(state)
    cached.load_state_dict(state)
    assert torch.equal(cached(x), ref(x))
    with torch.inference_mode():
        assert torch.equal(cached(x), ref(x))
    y = x.clone().requires_grad_()
    cached(y).sum().backward()  # a cache filled under inference_mode is not reused here
    assert y.grad is not None


def test_position_encoding_cache_returns_the_computed_values() -> None:
    pe = PositionEmbeddingSine(8)
    for shape in ((2, 3, 5, 7), (1, 3, 4, 4), (2, 3, 5, 7)):
        x = torch.zeros(shape)
        assert torch.equal(pe(x), pe.encode(x))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, 2:] = True
    assert torch.equal(pe(torch.zeros(1, 3, 4, 4), mask), pe.encode(torch.zeros(1, 3, 4, 4), mask))


class _InfAtStep(pl.Callback):
    """Makes the POS outputs infinite at the chosen training steps (an fp16 overflow, say)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            module._inf_hook = module.pos.register_forward_hook(
                lambda m, i, out: {**out, "pred_masks": out["pred_masks"] * float("inf")}
            )

    def on_train_batch_end(self, trainer, module, *args) -> None:
        hook = getattr(module, "_inf_hook", None)
        if hook is not None:
            hook.remove()
            module._inf_hook = None


def _fit(module: POSModule, scaler: torch.amp.GradScaler | None, inf_steps: set[int], steps: int) -> None:
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if scaler is not None else None
    fit_on(module, episode_batch(2, 0, 64, 3), steps, [_InfAtStep(inf_steps)], plugins=plugins)


def test_gradient_scaler_skips_a_non_finite_step_instead_of_stopping() -> None:
    module = _tiny_pos()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    _fit(module, scaler, {1}, 3)  # the overflow of step 1 is skipped by the scaler; training goes on
    assert scaler.get_scale() < 2.0**4
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_steps_stop_once_the_scaler_cannot_help() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2 * MIN_LOSS_SCALE)
    with pytest.raises(NonFiniteError, match=r"non-finite model outputs \(pred_masks"):
        _fit(_tiny_pos(), scaler, {0, 1, 2}, 3)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite model outputs \(pred_masks"):
        _fit(_tiny_pos(), None, {1}, 3)  # without a scaler: at once


def test_graphed_forward_runs_eagerly_off_cuda() -> None:
    from fewshot_seg.models.graphs import GraphedForward

    calls = []

    def fn(images: torch.Tensor, context: float) -> dict[str, torch.Tensor]:
        calls.append(images.shape)
        return {"out": images * context}

    graphed = GraphedForward(fn)
    x = torch.randn(2, 3)
    assert torch.equal(graphed(x, 2.0)["out"], x * 2.0) and len(calls) == 1  # no capture, no warm-up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_forward_replays_the_eager_result_on_cuda() -> None:
    from fewshot_seg.models.graphs import GraphedForward

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).cuda()
    graphed = GraphedForward(lambda images, scale: {"out": net(images) * scale})
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(5, 8, device="cuda")
            assert torch.equal(graphed(x, 0.5)["out"], net(x) * 0.5)
    assert len(graphed._graphs) == 1


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("case", ["self", "cross_bool", "cross_float", "cross_permuted_memory"])
def test_lean_attention_has_multihead_attentions_bits(case: str) -> None:
    from fewshot_seg.models.attention_layers import multi_head_attention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4)
    length, batch, src = 6, 2, 10
    tgt = torch.randn(length, batch, 32, requires_grad=True)
    memory = torch.randn(src, batch, 32, requires_grad=True)
    pos = torch.randn(src, batch, 32)
    if case == "cross_permuted_memory":  # the decoder's layout: a [B, C, S] map seen as [S, B, C]
        memory = torch.randn(batch, 32, src).permute(2, 0, 1).detach().requires_grad_()
    mask = torch.rand(batch * 4, length, src) < 0.4
    mask[:, :, 0] = False  # no fully masked row
    if case == "self":
        args: tuple = (tgt + 1.0, tgt + 1.0, tgt)
        ref_mask = ours_mask = None
    else:
        args = (tgt, memory + pos, memory)
        ref_mask = mask if case != "cross_float" else torch.zeros(mask.shape).masked_fill_(mask, -1e9)
        ours_mask = ref_mask
    inputs = [tgt] if case == "self" else [tgt, memory]
    ref = mha(*args, attn_mask=ref_mask, need_weights=False)[0]
    ours = multi_head_attention(mha, *args, ours_mask)
    assert torch.equal(ours, ref)
    weights = torch.randn(ref.shape)
    params = list(mha.parameters())
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            _grads((ours * weights).sum(), inputs + params), _grads((ref * weights).sum(), inputs + params)
        )
    )
    if case == "cross_bool":  # one [B, 1, L, S] mask broadcast over the heads: the same bits
        one = mask.view(batch, 4, length, src)[:, :1]
        shared = mask.view(batch, 4, length, src)[:, :1].expand(-1, 4, -1, -1).reshape(batch * 4, length, src)
        expected = mha(*args, attn_mask=shared, need_weights=False)[0]
        assert torch.equal(multi_head_attention(mha, *args, one), expected)


def test_linear_rows_is_f_linear() -> None:
    from fewshot_seg.models.linear import linear_rows

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24)
    for x in (torch.randn(5, 3, 16), torch.randn(3, 16, 5).permute(2, 0, 1), torch.randn(7, 16)):
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.equal(linear_rows(x, layer.weight, layer.bias), ref.reshape(-1, 24))


def test_paper_stage1_step_dispatches_at_most_5000_operations() -> None:
    """Issue 25's target, counted as benchmarks/host_overhead.py counts it (paper size, batch 8)."""
    from model_speed import PAPER

    torch.manual_seed(0)
    module = PAPER.pos_module()
    module.eval_class_ids = [1]
    counter = count_training_step(module, episode_batch(8, 0, 64, 4), "cpu", "32-true")
    assert sum(counter.ops.values()) <= 5000, dict(counter.ops)
    assert sum(counter.syncs.values()) <= 2, dict(counter.syncs)


def test_counter_prints_before_and_after_against_a_baseline_checkout(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--baseline DIR`` counts with that checkout's package in a subprocess; this checkout as its own
    baseline gives equal columns (deterministic counts), and ``--json`` writes what the table shows."""
    import json

    import host_overhead

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "counts.json"
    args = ["--config", "demo", "--size", "64", "--parts", "segmenter", "--baseline", str(repo)]
    host_overhead.main([*args, "--json", str(out)])
    counts = json.loads(out.read_text())["segmenter"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| total"))
    ops = f"{counts['total']['ops']:,}"
    syncs = counts["total"]["ours"] + counts["total"]["other"]
    assert row == f"| total | {ops} | {ops} | {syncs} | {syncs} |"
    with pytest.raises(SystemExit, match="no src/fewshot_seg"):
        host_overhead.main(["--parts", "segmenter", "--baseline", str(tmp_path)])


def test_size_cache_makes_once_stays_bounded_and_keys_inference_mode() -> None:
    from fewshot_seg.models.size_cache import SizeCache

    made: list[int] = []
    cache: SizeCache[int] = SizeCache(2)
    assert [cache.get(k, lambda k=k: made.append(k) or k) for k in (1, 1, 2, 1)] == [1, 1, 2, 1]
    assert made == [1, 2]
    cache.get(3, lambda: made.append(3) or 3)  # full: emptied first, so 1 is made again
    cache.get(1, lambda: made.append(1) or 1)
    assert made == [1, 2, 3, 1]
    with torch.inference_mode():  # not the tensor made outside inference mode
        assert cache.get(1, lambda: -1) == -1
