"""The results table: a row per fold summary; duplicates and corrupt files named; protocols never mixed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fewshot_seg.tools.aggregate import (
    SUMMARY_KIND,
    AggregateError,
    collect,
    find_summaries,
    main,
    summary_name,
)


def _summary(
    folder: Path, fold: int, miou: float, shot: int = 1, seed: int = 0, protocol: str = "spec"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    res = {
        "kind": SUMMARY_KIND,
        "dataset": "pascal5i",
        "protocol": protocol,
        "shot": shot,
        "seed": seed,
        "fold": fold,
        "miou": miou,
        "fbiou": 70.0 + fold,
        "oracle_miou": 80.0 + fold,
        "baseline_miou": 30.0,
    }
    path = folder / summary_name(shot)
    path.write_text(json.dumps(res))
    # The test run's own results.json sits beside it (train_fold keeps both): never counted.
    (folder / "fewshot-seg" / "test").mkdir(parents=True, exist_ok=True)
    (folder / "fewshot-seg" / "test" / "results.json").write_text(json.dumps({**res, "kind": None}))
    return path


def _four_folds(root: Path, values=(60.0, 70.0, 55.0, 51.0), **kw) -> None:
    for fold, miou in enumerate(values):
        _summary(root / f"fold{fold}" / f"seed{kw.get('seed', 0)}", fold, miou, **kw)


def test_paper_layout_and_csv(tmp_path: Path, capsys) -> None:
    _four_folds(tmp_path)
    _four_folds(tmp_path, values=(10.0, 20.0, 30.0, 40.0), shot=5)
    assert main([str(tmp_path), "-o", str(tmp_path / "summary")]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "**pascal5i, 1-shot, protocol spec**" in md and "**pascal5i, 5-shot, protocol spec**" in md
    assert "| model | 60.00 | 70.00 | 55.00 | 51.00 | **59.00** |" in md
    assert "| oracle | 80.00 | 81.00 | 82.00 | 83.00 | **81.50** |" in md
    assert "| heuristic baseline | 30.00 | 30.00 | 30.00 | 30.00 | **30.00** |" in md
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "dataset,protocol,fold,shot,seed,miou,fbiou,oracle_miou,baseline_miou,path"
    assert len(rows) == 1 + 8 + 2  # 8 fold rows + a mean row per shot
    assert any(r.startswith("pascal5i,spec,mean,1,0,59.0,71.5,81.5,30.0") for r in rows)
    assert "59.00" in capsys.readouterr().out


def test_seeds_give_mean_and_std(tmp_path: Path) -> None:
    _four_folds(tmp_path, seed=0)
    _four_folds(tmp_path, values=(62.0, 72.0, 57.0, 53.0), seed=1)
    assert main([str(tmp_path), "-o", str(tmp_path / "s")]) == 0
    md = (tmp_path / "s.md").read_text()
    assert "seeds 0, 1, mean ± std over seeds" in md
    assert "| model | 61.00 ± 1.41 | 71.00 ± 1.41 | 56.00 ± 1.41 | 52.00 ± 1.41 | **60.00 ± 1.41** |" in md


def test_rerun_copy_and_corrupt_file(tmp_path: Path, capsys) -> None:
    _four_folds(tmp_path)
    # A re-run writes the same summary file again: still one row per fold.
    _summary(tmp_path / "fold0" / "seed0", 0, 61.0)
    assert len(collect(find_summaries([tmp_path]))) == 4
    # A copied run folder duplicates fold 1: refused by name, or dropped with a warning.
    shutil.copytree(tmp_path / "fold1", tmp_path / "copy_of_fold1")
    os.utime(tmp_path / "copy_of_fold1" / "seed0" / summary_name(1), (1, 1))  # the older one
    with pytest.raises(AggregateError, match=r"two summaries of .*'fold': 1"):
        collect(find_summaries([tmp_path]))
    assert main([str(tmp_path)]) == 2 and "--drop-duplicates" in capsys.readouterr().err
    rows = collect(find_summaries([tmp_path]), drop_duplicates=True)
    assert [r["fold"] for r in rows] == [0, 1, 2, 3] and "copy_of" not in rows[1]["path"]
    # A corrupt file is named.
    bad = tmp_path / "fold3" / "seed0" / summary_name(1)
    bad.write_text("{not json")
    with pytest.raises(AggregateError, match=rf"{bad}: not a readable JSON file"):
        collect(find_summaries([tmp_path]), drop_duplicates=True)


def test_protocols_are_never_averaged(tmp_path: Path) -> None:
    _four_folds(tmp_path / "spec")
    _four_folds(tmp_path / "mm", values=(50.0, 50.0, 50.0, 50.0), protocol="mmformer")
    assert main([str(tmp_path), "-o", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "protocol spec" in md and "protocol mmformer" in md
    assert "**59.00**" in md and "**50.00**" in md


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("miou", "69.1", r'"miou" is the str \'69.1\', expected a number'),
        ("fold", "zero", r'"fold" is the str \'zero\', expected an integer'),
        ("shot", 1.5, r'"shot" is the float 1.5, expected an integer'),
        ("oracle_miou", [1], r'"oracle_miou" is the list \[1\], expected a number'),
        ("seed", True, r'"seed" is the bool True, expected an integer'),
    ],
)
def test_wrong_field_types_name_file_and_field(
    field: str, value: object, message: str, tmp_path: Path, capsys
) -> None:
    _four_folds(tmp_path)
    bad = tmp_path / "fold2" / "seed0" / summary_name(1)
    data = json.loads(bad.read_text())
    data[field] = value
    bad.write_text(json.dumps(data))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: ")
    with pytest.raises(AggregateError, match=message):
        collect(find_summaries([tmp_path]))
