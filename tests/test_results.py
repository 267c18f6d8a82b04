"""results.json, results.csv and the per-class table of a test whose episodes missed a class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import STAGE1, run_dir_args, tiny_data

from fewshot_seg.cli import main
from fewshot_seg.lightning.results import format_class_table, summarize, write_results
from fewshot_seg.metrics import FewShotIoU


class _Data:
    name, fold, shot = "toy", 0, 1

    def class_name(self, c: int) -> str:
        return {1: "cat", 2: "dog", 3: "cow"}[c]


def _result(pred: list[int]) -> dict:
    """A metric over classes 1..3 after one episode of class 1 and one of class 2 (2 pixels each)."""
    metric = FewShotIoU([1, 2, 3])
    target = torch.tensor([[[1, 0]], [[1, 1]]])
    metric.update(torch.tensor(pred).reshape(2, 1, 2), target, [1, 2])
    return metric.compute()


def test_a_class_without_episodes_is_named_and_left_out(tmp_path: Path) -> None:
    # model: class 1 IoU 100, class 2 IoU 50; oracle: 100 and 100; baseline: 0 and 50.
    results = {
        "model": _result([1, 0, 1, 0]),
        "oracle": _result([1, 0, 1, 1]),
        "baseline": _result([0, 1, 0, 1]),
    }
    summary = summarize(results, stage="mm", datamodule=_Data(), wall_time_s=1.0)

    assert summary["unscored_classes"] == [3]
    assert summary["miou"] == 75.0 and summary["oracle_miou"] == 100.0 and summary["baseline_miou"] == 25.0
    assert summary["class_iou"] == {"1": 100.0, "2": 50.0, "3": None}
    assert summary["oracle_class_iou"]["3"] is None and summary["class_episodes"]["3"] == 0

    table = format_class_table(summary).splitlines()
    assert table[-2] == "not scored (no episode): 3 cow; the mIoUs are over the other 2 classes"
    assert table[-1].startswith("mIoU 75.00  FB-IoU")
    assert [line.split()[:5] for line in table if line.strip().startswith("3 ")] == [
        ["3", "cow", "0", "-", "-"]
    ]

    json_path, csv_path = write_results(summary, tmp_path)
    assert json.loads(json_path.read_text())["class_iou"]["3"] is None
    rows = {r["class_id"]: r for r in csv.DictReader(csv_path.open())}
    assert rows["3"]["iou"] == "" and rows["3"]["episodes"] == "0" and float(rows["mean"]["iou"]) == 75.0


def test_every_class_scored_prints_as_before() -> None:
    metric = FewShotIoU([1, 2])
    metric.update(torch.tensor([[[1, 0]], [[1, 1]]]), torch.tensor([[[1, 0]], [[1, 1]]]), [1, 2])
    summary = summarize({"model": metric.compute()}, stage="mm", datamodule=_Data(), wall_time_s=1.0)
    assert summary["unscored_classes"] == [] and summary["miou"] == 100.0
    assert not any(line.startswith("not scored") for line in format_class_table(summary).splitlines())


def test_a_validation_that_misses_a_class_says_so(synthetic_root: Path, tmp_path: Path, monkeypatch) -> None:
    """4 validation episodes cannot draw the 5 novel classes: val/miou says which it is not over."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", *STAGE1, *tiny_data(synthetic_root), *run_dir_args(tmp_path, "v")]
    args += [
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
        "--model.init_args.loss.num_points=64",
    ]
    with pytest.warns(
        UserWarning, match=r"^val: class(es)? [\d, ]+ drew no episode among the 4; the mIoU is"
    ):
        main(args)
