"""FewShotIoU against the golden episodes (HSNet / PFENet semantics, SPEC §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot_seg.metrics import FewShotIoU, episode_intersection_union

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
    metric = FewShotIoU(ids)
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
    metric = FewShotIoU(_fold_ids_1based(golden), variant="pfenet")
    metric.update(inp["pred"], inp["gt"], inp["subcls_1based"])
    res = metric.compute()
    assert abs(float(res["miou"]) - out["miou"]) < 1e-4
    assert abs(float(res["fbiou"]) - out["fb_iou"]) < 1e-4
    got = torch.stack([res["class_iou"][c] for c in _fold_ids_1based(golden)])
    torch.testing.assert_close(got, 100 * out["class_iou"], atol=1e-4, rtol=0)


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
