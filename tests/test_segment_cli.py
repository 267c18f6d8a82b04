"""``fewshot-seg segment``: a folder labelled from a few examples; resumable, nothing lost, a manifest."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_seg import Segmenter
from fewshot_seg.cli import entry_point
from fewshot_seg.tools.segment import main


def _tree(root: Path) -> None:
    rng = np.random.default_rng(5)
    for rel, (h, w) in {
        "a.jpg": (40, 50),
        "a.png": (30, 30),
        "sub/b.jpg": (64, 48),
        "c.webp": (20, 70),
    }.items():
        (root / "q" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "q" / rel)
    (root / "q" / "broken.jpg").write_text("not an image")
    (root / "q" / "notes.txt").write_text("hello")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "s.jpg")
    mask = np.zeros((40, 50), np.uint8)
    mask[5:25, 10:40] = 255
    Image.fromarray(mask).save(root / "s_mask.png")


def _args(root: Path, ckpt: Path, *extra: str) -> list[str]:
    support = ["--support", str(root / "s.jpg"), str(root / "s_mask.png")]
    where = ["--queries", str(root / "q"), "--out", str(root / "q" / "out")]
    return ["--ckpt", str(ckpt), *support, *where, "--device", "cpu", *extra]


def _manifest(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {Path(r["query"]).name: r for r in csv.DictReader(f)}


def test_segment_folder(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    out = tmp_path / "q" / "out"  # inside the queries folder: its files are never read as queries
    assert main(_args(tmp_path, stage2_ckpt, "--overlay", "--batch-size", "2")) == 1  # broken.jpg failed
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.png"))
    assert written == ["a.jpg_mask.png", "a.png_mask.png", "c_mask.png", "sub/b_mask.png"]
    assert (out / "sub" / "b_overlay.png").is_file()
    seg = Segmenter.from_checkpoint(stage2_ckpt, device="cpu")
    supports = seg.encode_supports([tmp_path / "s.jpg"], [tmp_path / "s_mask.png"])
    (expected,) = seg.segment([tmp_path / "q" / "sub" / "b.jpg"], supports)
    mask = np.array(Image.open(out / "sub" / "b_mask.png"))
    assert mask.shape == (64, 48) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask // 255, expected)
    rows = _manifest(out / "manifest.csv")
    assert rows["b.jpg"]["status"] == "written" and rows["b.jpg"]["mask"] == "sub/b_mask.png"
    assert float(rows["b.jpg"]["foreground_fraction"]) == pytest.approx(expected.mean(), abs=1e-6)
    assert rows["broken.jpg"]["status"].startswith("failed: cannot read query")
    captured = capsys.readouterr()
    assert "broken.jpg: cannot read query" in captured.err and "notes.txt" in captured.out

    # Again: nothing redone, nothing lost; --overwrite redoes them.
    before = (out / "c_mask.png").stat().st_mtime_ns
    assert main(_args(tmp_path, stage2_ckpt)) == 1
    assert (out / "c_mask.png").stat().st_mtime_ns == before
    assert _manifest(out / "manifest.csv")["c.webp"]["status"] == "exists"
    (tmp_path / "q" / "broken.jpg").unlink()
    assert main(_args(tmp_path, stage2_ckpt, "--overwrite")) == 0
    assert (out / "c_mask.png").stat().st_mtime_ns > before
    assert {r["status"] for r in _manifest(out / "manifest.csv").values()} == {"written"}


def test_segment_user_errors_one_line(
    stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    _tree(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fewshot-seg", "segment", *_args(tmp_path, stage1_ckpt)])
    with pytest.raises(SystemExit) as info:
        entry_point()  # the console script dispatches to the tool
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a stage-1 (POSModule) checkpoint" in err[0]
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "s_mask.png")
    assert main(_args(tmp_path, stage2_ckpt)) == 2
    err = capsys.readouterr().err
    assert "support mask 0" in err and "marks no object pixel" in err
