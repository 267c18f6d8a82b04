"""``predict`` never loses work: unique output names, bad queries reported and skipped, odd files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cfg, run_dir_args
from PIL import Image

from datamodules import DatasetError
from fewshot_seg.cli import main, user_error
from fewshot_seg.lightning.base import EpisodeModule
from fewshot_seg.outputs import OutputError


def _image(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, h: int = 48, w: int = 64, empty: bool = False) -> None:
    m = np.zeros((h, w), dtype=np.uint8)
    if not empty:
        m[10:30, 20:50] = 255 - 1
    Image.fromarray(m).save(path)


def _predict(
    folder: Path, out: Path, stage1: Path, stage2: Path, *extra: str, out_dir: Path | None = None
) -> None:
    main(
        [
            "predict",
            *cfg("stage2_mm_cpu_demo.yaml", "trainer.yaml"),
            "--data=datamodules.FolderEpisodeDataModule",
            *run_dir_args(out / "runs"),
            f"--data.root={folder}",
            "--data.image_size=64",
            "--data.batch_size=2",
            f"--model.init_args.stage1_checkpoint={stage1}",
            f"--model.init_args.predict_dir={out_dir or out / 'png'}",
            f"--ckpt_path={stage2}",
            *extra,
        ]
    )


def test_predict_names_skips_and_reports(
    stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "episode"
    _image(folder / "supports" / "s0.jpg")
    _mask(folder / "supports" / "s0_mask.png")
    q = folder / "queries"
    _image(q / "a.jpg", seed=1)
    _image(q / "a.png", seed=2)  # same stem as a.jpg: its own outputs
    _image(q / "c.webp", seed=3)  # any format PIL reads
    _image(q / "sub" / "d.jpg", seed=4)  # sub-folders too
    (q / "bad.jpg").write_text("not an image")  # unreadable: reported, the others still written
    _image(q / "e.jpg", seed=5)
    _mask(q / "e_mask.png", h=20, w=20)  # wrong size: reported
    (q / "notes.txt").write_text("hello")  # not an image: named as skipped
    with pytest.raises(SystemExit) as exit_info:
        _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt)
    assert exit_info.value.code == 1  # after writing everything else
    png = tmp_path / "png"
    written = sorted(p.relative_to(png).as_posix() for p in png.rglob("*_mask.png"))
    # One naming with segment and serve (fewshot_seg.outputs): an extension only where two names collide.
    assert written == [
        "a.jpg_c1_mask.png",
        "a.png_c1_mask.png",
        "c_c1_mask.png",
        "sub/d_c1_mask.png",
    ]
    assert not list(png.rglob(".*.tmp"))  # written atomically: no temporary file left
    assert Image.open(png / "a.jpg_c1_mask.png").size == (64, 48)
    out = capsys.readouterr().out
    assert f"predictions written to {png}" in out
    assert "1 file(s) skipped" in out and "notes.txt" in out
    assert "2 queries could not be predicted" in out
    assert "bad.jpg: cannot read image" in out and "e_mask.png is 20x20 but image" in out


def _episode(folder: Path, queries: int = 1) -> None:
    _image(folder / "supports" / "s0.jpg")
    _mask(folder / "supports" / "s0_mask.png")
    for i in range(queries):
        _image(folder / "queries" / f"q{i}.jpg", seed=i + 1)


def test_empty_support_mask_refused(stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "episode"
    _image(folder / "supports" / "s0.jpg")
    _mask(folder / "supports" / "s0_mask.png", empty=True)
    _image(folder / "queries" / "q.jpg", seed=1)
    with pytest.raises(Exception, match=r"support mask .*s0_mask.png marks no object pixel") as info:
        _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt)
    assert isinstance(user_error(info.value), DatasetError)
    assert not list((tmp_path / "png").rglob("*.png"))


def test_outputs_never_inside_the_queries_nor_over_an_earlier_run(
    stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "episode"
    _episode(folder, queries=2)
    inside = folder / "queries" / "out"
    with pytest.raises(Exception, match=r"output folder .*queries/out is inside the input folder") as info:
        _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt, out_dir=inside)
    assert isinstance(user_error(info.value), OutputError) and not inside.exists()
    _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt)
    first = (tmp_path / "png" / "q0_c1_mask.png").stat().st_mtime_ns
    with pytest.raises(Exception, match=r"already holds 4 output file\(s\) of an earlier run") as info:
        _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt)  # a re-run refuses before predicting
    assert isinstance(user_error(info.value), OutputError)
    assert (tmp_path / "png" / "q0_c1_mask.png").stat().st_mtime_ns == first
    _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt, "--model.init_args.overwrite_predictions=true")
    assert (tmp_path / "png" / "q0_c1_mask.png").stat().st_mtime_ns > first


def test_unwritable_output_folder_refused_first(
    stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "episode"
    _episode(folder)
    (tmp_path / "a_file").write_text("")
    called: list[int] = []
    monkeypatch.setattr(EpisodeModule, "predict_step", lambda *a, **k: called.append(1))
    with pytest.raises(Exception, match=r"cannot write to output folder .*a_file/png") as info:
        _predict(folder, tmp_path, stage1_ckpt, stage2_ckpt, out_dir=tmp_path / "a_file" / "png")
    assert isinstance(user_error(info.value), OutputError) and called == []  # before any query


def test_test_scores_only_queries_with_masks(
    stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "episode"
    _episode(folder, queries=3)
    _mask(folder / "queries" / "q1_mask.png")
    cli = main(
        [
            "test",
            *cfg("stage2_mm_cpu_demo.yaml", "trainer.yaml"),
            "--data=datamodules.FolderEpisodeDataModule",
            *run_dir_args(tmp_path / "runs"),
            f"--data.root={folder}",
            "--data.image_size=64",
            f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
            f"--ckpt_path={stage2_ckpt}",
        ]
    )
    summary = cli.model.test_results
    assert summary["class_episodes"] == {"1": 1}  # q1 only; q0 and q2 have no mask to score against
    assert (summary["dataset"], summary["shot"]) == ("folder", 1)
    captured = capsys.readouterr()
    assert "2 queries without a mask not scored" in captured.err and "q0.jpg" in captured.err
    assert "(folder 1-shot" in captured.out and "None" not in captured.out.split("(folder")[1]
