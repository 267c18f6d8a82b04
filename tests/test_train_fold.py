"""``make train-fold``'s driver end to end on tiny data: one summary per shot, a re-run skips or resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import tiny_data

from fewshot_seg.tools.aggregate import SUMMARY_KIND
from fewshot_seg.tools.aggregate import main as aggregate
from fewshot_seg.tools.train_fold import main as train_fold


def _args(root: Path, run_dir: Path, *options: str) -> list[str]:
    tiny = [
        *tiny_data(root),  # (val/test episodes 4: a second run re-uses the same cached lists)
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_model_summary=false",
    ]
    return [
        "--dataset",
        "synthetic",
        "--fold",
        "0",
        "--run-dir",
        str(run_dir),
        "--no-gpu",
        *options,
        "--",
        *tiny,
    ]


def test_train_fold_writes_one_summary_and_resumes(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "fold0"
    out = train_fold(_args(synthetic_root, run, "--shots", "1", "2"))
    assert out == run / "summary-2shot.json"
    for shot in (1, 2):
        summary = json.loads((run / f"summary-{shot}shot.json").read_text())
        assert summary["kind"] == SUMMARY_KIND and summary["shot"] == shot and summary["fold"] == 0
        assert summary["seed"] == 0 and summary["protocol"] == "spec" and summary["dataset"] == "synthetic"
    stages = sorted(p.name for p in (run / "fewshot-seg").iterdir())
    assert stages == [
        "synthetic-fold0-seed0-stage1",
        "synthetic-fold0-seed0-stage2-1shot",
        "synthetic-fold0-seed0-stage2-2shot",
        "synthetic-fold0-seed0-test-1shot",
        "synthetic-fold0-seed0-test-2shot",
    ]
    capsys.readouterr()

    # Again: every stage is done, nothing runs, and it says so.
    train_fold(_args(synthetic_root, run, "--shots", "1", "2"))
    printed = capsys.readouterr().out
    assert "$ " not in printed
    assert "stage 1: done, skipped" in printed and "stage 2, 2-shot: done, skipped" in printed
    assert "test, 1-shot: results up to date, skipped" in printed

    # Other arguments than the recorded ones: refused in one line (exit 2), nothing run or replaced.
    before = (run / "summary-1shot.json").read_text()
    with pytest.raises(SystemExit) as refused:
        train_fold([*_args(synthetic_root, run), "--trainer.max_steps=3"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {run} was trained with other arguments (--trainer.max_steps: 2 -> 3): pass --force to "
        f"start this fold over (the earlier run is moved into {run}/replaced-<time>/), or use another "
        "--run-dir"
    ]
    assert (run / "summary-1shot.json").read_text() == before

    # An interrupted stage 2 (checkpoint written, never marked done) resumes from its last.ckpt.
    (run / "fewshot-seg" / "synthetic-fold0-seed0-stage2-1shot" / "done.json").unlink()
    train_fold(_args(synthetic_root, run))
    printed = capsys.readouterr().out
    assert printed.count("$ ") == 2 and "--ckpt_path=last" in printed  # stage 2 resumed, then its test
    assert "stage1" not in printed.split("$ ")[1].split("fit")[0]

    # One row per fold and shot in the table.
    assert aggregate([str(tmp_path), "-o", str(tmp_path / "table")]) == 0
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 1 + 2 + 2

    kept = (run / "summary-1shot.json").read_text()
    # --force: the earlier run is moved aside (kept), then the fold starts over (here it stops at once).
    with pytest.raises(SystemExit, match="stage failed"):
        train_fold([*_args(synthetic_root, run, "--force"), "--trainer.max_stepz=3"])
    (aside,) = run.glob("replaced-*")
    assert (aside / "summary-1shot.json").read_text() == kept and not (run / "summary-1shot.json").exists()
    assert "--trainer.max_stepz=3" in json.loads((run / "train_fold.json").read_text())["extra"]
    assert aggregate([str(run)]) == 2  # the moved-aside summaries are not counted: none left
    capsys.readouterr()


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"config .*trainer.yaml not found: pass --config-dir"):
        train_fold(["--config-dir", str(tmp_path), "--run-dir", str(tmp_path / "r")])


def test_a_dangling_last_ckpt_resumes_instead_of_restarting(tmp_path: Path) -> None:
    import torch

    from fewshot_seg.tools.train_fold import Stage

    stage = Stage(tmp_path, "synthetic-fold0-seed0-stage1")
    ckpts = stage.folder / "checkpoints"
    ckpts.mkdir(parents=True)
    assert stage.resume_args() == []  # nothing there: a fresh start
    torch.save({"global_step": 4}, ckpts / "best-step4.ckpt")
    (ckpts / "last.ckpt").symlink_to("best-step2.ckpt")  # killed while re-linking: dangling
    # Restarting from step 0 would overwrite best-step4.ckpt: resume (from the newest usable file).
    assert stage.resume_args() == ["--ckpt_path=last"]


def test_force_moves_the_earlier_run_aside(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    from fewshot_seg.tools.train_fold import RECORD, move_aside

    run = tmp_path / "fold0"
    (run / "fewshot-seg" / "x-stage1" / "checkpoints").mkdir(parents=True)
    (run / "fewshot-seg" / "x-stage1" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run / "summary-1shot.json").write_text("{}")
    (run / RECORD).write_text("{}")
    (run / "notes.txt").write_text("mine")
    aside = move_aside(run)
    assert aside.parent == run and aside.name.startswith("replaced-")
    assert (aside / "fewshot-seg" / "x-stage1" / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    assert (aside / "summary-1shot.json").exists() and (aside / RECORD).exists()
    assert sorted(p.name for p in run.iterdir()) == sorted([aside.name, "notes.txt"])  # the user's file stays


def test_a_corrupt_done_json_is_named_not_rerun(tmp_path: Path, capsys) -> None:
    from fewshot_seg.tools.train_fold import Stage

    stage = Stage(tmp_path, "synthetic-fold0-seed0-stage1")
    stage.folder.mkdir(parents=True)
    assert stage.done is None  # not finished
    stage.done_file.write_text('{"best": ')  # truncated by a full disk, say
    with pytest.raises(SystemExit) as info:
        _ = stage.done
    assert info.value.code == 2
    assert f"{stage.done_file} is unreadable" in capsys.readouterr().err


def test_rank_and_project_are_read_where_they_are_set(tmp_path: Path, monkeypatch) -> None:
    from fewshot_seg import config_dir
    from fewshot_seg.tools.train_fold import logger_project, rank_zero

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not rank_zero()  # read when asked, not when the module was imported
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert rank_zero()
    trainer = config_dir() / "trainer.yaml"
    assert logger_project([trainer]) == "fewshot-seg"  # trainer.yaml's, the one place it is set
    assert logger_project([trainer], ["--trainer.logger.init_args.project=mine"]) == "mine"


def test_a_rerun_that_runs_nothing_keeps_the_wall_time(tmp_path: Path, capsys) -> None:
    """All stages done and the test up to date: the summary keeps the time of the run that made it."""
    run = tmp_path / "fold0"
    stages = run / "fewshot-seg"
    for tag, best in (("stage1", "s1.ckpt"), ("stage2-1shot", "s2.ckpt")):
        (stages / f"synthetic-fold0-seed0-{tag}").mkdir(parents=True)
        (stages / f"synthetic-fold0-seed0-{tag}" / "done.json").write_text(json.dumps({"best": best}))
    test = stages / "synthetic-fold0-seed0-test-1shot"
    test.mkdir()
    results = {"miou": 60.0, "fbiou": 70.0, "class_iou": {"1": 60.0}, "dataset": "synthetic", "fold": 0}
    (test / "results.json").write_text(json.dumps({**results, "shot": 1, "wall_time_s": 30.0}))
    args = ["--run-dir", str(run), "--no-gpu"]
    # The summary the real run wrote (212.3 s: both stages and the test), after its results.json.
    (run / "summary-1shot.json").write_text(
        json.dumps({**results, "wall_time_s": 212.3, "test_results": str(test / "results.json")})
    )
    train_fold(args)
    printed = capsys.readouterr().out
    assert "$ " not in printed  # nothing ran
    summary = json.loads((run / "summary-1shot.json").read_text())
    assert summary["wall_time_s"] == 212.3 and summary["test_wall_time_s"] == 30.0
    # A summary of other results (the test ran again since) is no time of these: this run's own.
    os.utime(run / "summary-1shot.json", (1, 1))
    train_fold(args)
    assert json.loads((run / "summary-1shot.json").read_text())["wall_time_s"] < 60.0
