"""``fewshot-seg segment`` folder runs: a run record, the folder lock, overlays repaired, bad files named."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_mask_rule import _png_header_only

from fewshot_seg.folder_lock import RunLock
from fewshot_seg.tools.segment import main
from fewshot_seg.tools.segment_run import LOCK_NAME, RUN_RECORD


def _tree(root: Path) -> None:
    rng = np.random.default_rng(7)
    for rel, (h, w) in {"a.jpg": (40, 50), "b.png": (30, 30), "sub/c.jpg": (36, 48)}.items():
        (root / "q" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "q" / rel)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "s.jpg")
    mask = np.zeros((40, 50), np.uint8)
    mask[5:25, 10:40] = 255
    Image.fromarray(mask).save(root / "s_mask.png")


def _args(root: Path, ckpt: Path, *extra: str, out: Path | None = None) -> list[str]:
    support = ["--support", str(root / "s.jpg"), str(root / "s_mask.png")]
    where = ["--queries", str(root / "q"), "--out", str(out or root / "out")]
    return ["--ckpt", str(ckpt), *support, *where, "--device", "cpu", *extra]


def _statuses(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv") as f:
        return {Path(r["query"]).name: r["status"] for r in csv.DictReader(f)}


def test_run_record_refuses_another_run(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    out = tmp_path / "out"
    assert main(_args(tmp_path, stage2_ckpt)) == 0
    record = json.loads((out / RUN_RECORD).read_text())
    assert set(record) == {"checkpoint", "classes", "image_size", "precision"}
    assert len(record["classes"]["object"]) == 1 and record["precision"] == "32"
    assert "support mask" in capsys.readouterr().out  # the mask rule it was read by
    # Another image size (or checkpoint, supports, precision): refused, nothing mixed.
    before = (out / "a_mask.png").stat().st_mtime_ns
    assert main(_args(tmp_path, stage2_ckpt, "--image-size", "96")) == 2
    err = capsys.readouterr().err
    assert "holds the masks of another run" in err and "image_size" in err and "--overwrite" in err
    assert (out / "a_mask.png").stat().st_mtime_ns == before
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 5:25] = 255
    Image.fromarray(mask).save(tmp_path / "s_mask.png")
    assert main(_args(tmp_path, stage2_ckpt)) == 2
    assert "differs: classes" in capsys.readouterr().err
    # --overwrite redoes every query with the new run and records it.
    assert main(_args(tmp_path, stage2_ckpt, "--overwrite")) == 0
    assert set(_statuses(out).values()) == {"written"}
    assert json.loads((out / RUN_RECORD).read_text())["classes"] != record["classes"]


def test_overlays_drawn_on_a_re_run_and_corrupt_masks_redone(stage2_ckpt: Path, tmp_path: Path) -> None:
    _tree(tmp_path)
    out = tmp_path / "out"
    assert main(_args(tmp_path, stage2_ckpt)) == 0
    assert not list(out.rglob("*_overlay.png"))
    (out / "b_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a corrupt finished mask
    assert main(_args(tmp_path, stage2_ckpt, "--overlay")) == 0
    overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_overlay.png"))
    assert overlays == ["a_overlay.png", "b_overlay.png", "sub/c_overlay.png"]
    assert _statuses(out) == {"a.jpg": "exists", "b.png": "written", "c.jpg": "exists"}
    assert np.asarray(Image.open(out / "b_mask.png")).shape == (30, 30)


def test_a_held_lock_refuses_a_second_run(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    out = tmp_path / "out"
    lock = RunLock(out, LOCK_NAME, "segment run").acquire()
    try:
        assert main(_args(tmp_path, stage2_ckpt)) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another segment run" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not list(out.rglob("*_mask.png"))
    assert main(_args(tmp_path, stage2_ckpt)) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_huge_query_is_named_the_others_written(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    _png_header_only(tmp_path / "q" / "huge.png", 20000, 20000)
    assert main(_args(tmp_path, stage2_ckpt)) == 1
    statuses = _statuses(tmp_path / "out")
    assert statuses.pop("huge.png").startswith("failed: query") and "too large" in capsys.readouterr().err
    assert set(statuses.values()) == {"written"}


def test_out_equal_to_the_queries_folder(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    assert main(_args(tmp_path, stage2_ckpt, out=tmp_path / "q")) == 2
    assert "is the queries folder" in capsys.readouterr().err


def test_support_in_the_wrong_order(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    args = _args(tmp_path, stage2_ckpt)
    i = args.index("--support")
    args[i + 1], args[i + 2] = args[i + 2], args[i + 1]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the image comes first, then its mask" in err and f"--support {tmp_path / 's.jpg'}" in err
    # Names that say nothing: the contents do (a two-value grey picture first, a colour photo second).
    (tmp_path / "s.jpg").rename(tmp_path / "photo.jpg")
    (tmp_path / "s_mask.png").rename(tmp_path / "label.png")
    args[i + 1], args[i + 2] = str(tmp_path / "label.png"), str(tmp_path / "photo.jpg")
    assert main(args) == 2
    assert "holds at most two grey values" in capsys.readouterr().err


def test_image_size_zero_is_refused(stage2_ckpt: Path, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    assert main(_args(tmp_path, stage2_ckpt, "--image-size", "0")) == 2
    assert "image_size must be at least 32, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"hello world\nexample text\n", b"e"])
def test_text_file_as_checkpoint(content: bytes, tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    (tmp_path / "notes.ckpt").write_bytes(content)
    assert main(_args(tmp_path, tmp_path / "notes.ckpt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable PyTorch checkpoint" in err[0]
