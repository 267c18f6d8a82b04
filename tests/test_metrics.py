"""FewShotIoU against the golden episodes (HSNet / PFENet semantics, SPEC §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot_seg.metrics import FewShotIoU, episode_intersection_union, unscored_note

GOLDEN = Path(__file__).parent / "data" / "golden" / "metric_episodes.pt"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


def _fold_ids_1based(g: dict) -> list[int]:
    return [c + 1 for c in g["config"]["fold_class_ids_0based"]]


def test_per_episode_areas_match_golden(golden: dict) -> None:
    pred, gt = golden["inputs"]["pred"], golden["inputs"]["gt"]
    ref = golden["outputs"]["per_episode"]
    for e in range(pred.shape[0]):
        inter, union = episode_intersection_union(pred[e], gt[e])
        assert inter.tolist() == ref["intersection"][e].tolist()
        assert union.tolist() == ref["union"][e].tolist()


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_hsnet_golden(golden: dict, batch: int) -> None:
    inp, out = golden["inputs"], golden["outputs"]["hsnet"]
    ids = _fold_ids_1based(golden)
    metric = FewShotIoU(ids, unscored="zero")  # the reference evaluator's mean: an empty class is 0
    for s in range(0, inp["pred"].shape[0], batch):
        sl = slice(s, s + batch)
        metric.update(inp["pred"][sl], inp["gt"][sl].long(), inp["subcls_1based"][sl])
    res = metric.compute()
    assert abs(float(res["miou"]) - out["miou"]) < 1e-4
    assert abs(float(res["fbiou"]) - out["fb_iou"]) < 1e-4
    expected = 100 * out["iou_fold_classes_fg"]
    for c, e in zip(ids, expected.tolist()):
        assert abs(float(res["class_iou"][c]) - e) < 1e-4
    # The class without episodes is in the mean, as 0.
    empty = golden["config"]["class_without_episodes_0based"] + 1
    assert float(res["class_iou"][empty]) == 0.0
    assert int(res["class_episodes"][empty]) == 0
    assert sum(int(n) for n in res["class_episodes"].values()) == 300
    # And it is really not the (wrong) mean of per-episode IoUs.
    assert abs(float(res["miou"]) - golden["outputs"]["contrast_mean_of_episode_fg_iou"]) > 1.0


def test_pfenet_variant_golden(golden: dict) -> None:
    inp, out = golden["inputs"], golden["outputs"]["pfenet_mmformer"]
    metric = FewShotIoU(_fold_ids_1based(golden), variant="pfenet", unscored="zero")
    metric.update(inp["pred"], inp["gt"], inp["subcls_1based"])
    res = metric.compute()
    assert abs(float(res["miou"]) - out["miou"]) < 1e-4
    assert abs(float(res["fbiou"]) - out["fb_iou"]) < 1e-4
    got = torch.stack([res["class_iou"][c] for c in _fold_ids_1based(golden)])
    torch.testing.assert_close(got, 100 * out["class_iou"], atol=1e-4, rtol=0)


def test_miou_is_over_the_scored_classes(golden: dict) -> None:
    """By default a class drawn in no episode is named and left out of the mIoU, not counted as 0."""
    inp, out = golden["inputs"], golden["outputs"]["hsnet"]
    ids = _fold_ids_1based(golden)
    empty = golden["config"]["class_without_episodes_0based"] + 1
    metric = FewShotIoU(ids)
    metric.update(inp["pred"], inp["gt"].long(), inp["subcls_1based"])
    res = metric.compute()
    assert res["unscored"] == [empty]
    scored = [100 * v for c, v in zip(ids, out["iou_fold_classes_fg"].tolist()) if c != empty]
    assert float(res["miou"]) == pytest.approx(sum(scored) / len(scored), abs=1e-4)
    assert float(res["miou"]) == pytest.approx(out["miou"] * len(ids) / len(scored), abs=1e-4)
    assert float(res["fbiou"]) == pytest.approx(out["fb_iou"], abs=1e-4)  # sums: no class is left out
    assert unscored_note(res, "test") == (
        f"test: class {empty} drew no episode among the 300; the mIoU is the mean over the other 4 classes"
    )
    one = FewShotIoU([3, 4])
    one.update(torch.ones(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.long), [3])
    assert float(one.compute()["miou"]) == 100.0 and one.compute()["unscored"] == [4]
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(FewShotIoU([3]).compute()["miou"]) == 0.0  # nothing scored at all


def test_list_of_differently_sized_predictions() -> None:
    metric = FewShotIoU([3, 4])
    pred = [torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 0, 0, 0, 0]])]
    target = [torch.tensor([[1, 1, 255], [0, 0, 0]]), torch.tensor([[1, 1, 0, 0, 255]])]
    metric.update(pred, target, torch.tensor([3, 4]))
    res = metric.compute()
    # class 3: fg I=2, U=5 (the ignored pixel is dropped); class 4: fg I=1, U=2.
    assert float(res["class_iou"][3]) == pytest.approx(40.0)
    assert float(res["class_iou"][4]) == pytest.approx(50.0)
    assert float(res["miou"]) == pytest.approx(45.0)
    # bg: I = 0 + 2, U = 3 + 3.
    assert float(res["fbiou"]) == pytest.approx(100 * (2 / 6 + 3 / 7) / 2)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_accumulates_not_averages_and_resets() -> None:
    metric = FewShotIoU([1])
    metric.update(torch.tensor([[[1, 1, 1, 1]]]), torch.tensor([[[1, 1, 1, 1]]]), [1])  # IoU 1, U 4
    metric.update(torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[1, 1, 0, 0]]]), [1])  # IoU 0, U 3
    assert float(metric.compute()["miou"]) == pytest.approx(100 * 4 / 7)
    metric.reset()
    assert float(metric.compute()["miou"]) == 0.0


def test_rejects_unknown_class_and_bad_shapes() -> None:
    metric = FewShotIoU([1, 2])
    with pytest.raises(ValueError, match=r"\[7\]"):
        metric.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), [7])
    with pytest.raises(ValueError, match="differ in size"):
        metric.update([torch.zeros(2, 2)], [torch.zeros(3, 2)], [1])
    with pytest.raises(ValueError, match="variant"):
        FewShotIoU([1], variant="mean")  # type: ignore[arg-type]


def _random_episodes(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 2, (n, 6, 7), generator=g)
    target = torch.randint(0, 2, (n, 6, 7), generator=g)
    target[:, 0, 0] = 255  # an ignored pixel in every episode
    return pred, target, torch.randint(1, 4, (n,), generator=g).tolist()


def _sync_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = FewShotIoU([1, 2, 3])
        pred, target, cls = _random_episodes(0, 10)
        metric.update(pred[rank::world], target[rank::world], cls[rank::world])  # this rank's shard
        torch.save(metric.compute(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_compute_sums_the_states_of_all_processes(tmp_path: Path) -> None:
    """Two gloo processes, each scoring half of the episodes, compute what one process scoring all does."""
    import torch.multiprocessing as mp

    world, out = 2, str(tmp_path / "out")
    mp.spawn(_sync_worker, args=(world, str(tmp_path / "init"), out), nprocs=world, join=True)
    single = FewShotIoU([1, 2, 3])
    single.update(*_random_episodes(0, 10))
    expected = single.compute()
    for rank in range(world):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert {c: int(n) for c, n in got["class_episodes"].items()} == {
            c: int(n) for c, n in expected["class_episodes"].items()
        }
        assert float(got["miou"]) == float(expected["miou"]) and float(got["fbiou"]) == float(
            expected["fbiou"]
        )
        assert all(float(got["class_iou"][c]) == float(expected["class_iou"][c]) for c in (1, 2, 3))
