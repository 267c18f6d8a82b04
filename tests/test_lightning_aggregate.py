"""Aggregating per-fold results.json into one table."""

from __future__ import annotations

import json
from pathlib import Path

from fewshot_seg.tools.aggregate import aggregate, find_results, main


def _write(folder: Path, fold: int, miou: float, shot: int = 1) -> None:
    folder.mkdir(parents=True)
    res = {
        "dataset": "pascal",
        "shot": shot,
        "stage": "mm",
        "fold": fold,
        "miou": miou,
        "fbiou": 70.0 + fold,
        "oracle_miou": 80.0,
        "baseline_miou": 30.0,
        "class_iou": {},
    }
    (folder / "results.json").write_text(json.dumps(res))


def test_aggregate_folds_and_mean(tmp_path: Path, capsys) -> None:
    for fold, miou in enumerate([60.0, 70.0, 55.0, 51.0]):
        _write(tmp_path / f"fold{3 - fold}" / "run", fold, miou)
    _write(tmp_path / "other", 0, 10.0, shot=5)
    rows = aggregate(find_results([tmp_path]))
    one_shot = [r for r in rows if r["shot"] == 1]
    assert [r["fold"] for r in one_shot] == [0, 1, 2, 3, "mean"]
    assert one_shot[-1]["miou"] == (60 + 70 + 55 + 51) / 4
    assert one_shot[-1]["fbiou"] == 71.5
    five = [r for r in rows if r["shot"] == 5]
    assert five[-1]["fold"] == "mean" and five[-1]["miou"] == 10.0

    assert main([str(tmp_path), "-o", str(tmp_path / "summary")]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "| **mean** |" in md and "**59.00**" in md
    csv_text = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_text[0].startswith("dataset,shot,stage,fold,miou")
    assert len(csv_text) == 1 + 7
    assert "59.00" in capsys.readouterr().out
