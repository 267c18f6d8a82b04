"""Provenance: checkpoints and results say what data trained a model; folds and datasets cannot leak."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import STAGE2, cfg, run_dir_args, tiny_data

from fewshot_seg.checkpoints import CheckpointError
from fewshot_seg.cli import main, user_error
from fewshot_seg.lightning.provenance import PROVENANCE_KEY


def _stage2(root: Path, out: Path, stage1: Path, *extra: str) -> list[str]:
    return [
        *STAGE2,
        *tiny_data(root),
        *run_dir_args(out, "run"),
        f"--model.init_args.stage1_checkpoint={stage1}",
        *extra,
    ]


def test_checkpoint_records_provenance(stage1_ckpt: Path, stage2_ckpt: Path) -> None:
    for path, stage in ((stage1_ckpt, "pos"), (stage2_ckpt, "mm")):
        rec = torch.load(path, map_location="cpu", weights_only=True)[PROVENANCE_KEY]
        data = rec["data"]
        assert rec["stage"] == stage and data["dataset"] == "synthetic" and data["fold"] == 0
        assert data["novel_classes"] == [1, 2, 3, 4, 5] and data["base_classes"] == list(range(6, 21))
        assert data["image_size"] == 64 and data["protocol"] == "spec" and data["seeds"]["test"] == 321
        assert len(data["episode_lists"]["val"]["sha256"]) == 64
        assert rec["package_version"] and rec["git_commit"]
        assert rec["config"]["data"]["init_args"]["fold"] == 0  # the whole resolved config
        assert rec["trained_on"]["classes"] == list(range(6, 21))
    s2 = torch.load(stage2_ckpt, map_location="cpu", weights_only=True)[PROVENANCE_KEY]
    assert s2["stage1"]["checkpoint"] == str(stage1_ckpt) and s2["stage1"]["provenance"]["stage"] == "pos"


def test_stage2_at_another_fold_is_refused(stage1_ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    args = _stage2(synthetic_root, tmp_path, stage1_ckpt, "--data.init_args.fold=1", "--trainer.max_steps=1")
    with pytest.raises(CheckpointError, match=r"fold 0, this DataModule is fold 1; its novel classes \[6, 7"):
        main(["fit", *args])
    # Deliberate: allowed with the opt-in, and recorded.
    cli = main(["fit", *args, "--model.init_args.allow_class_overlap=true", "--trainer.val_check_interval=1"])
    assert cli.trainer.global_step == 1


def test_test_and_predict_at_another_fold_are_refused(
    stage1_ckpt: Path, stage2_ckpt: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    args = _stage2(
        synthetic_root, tmp_path, stage1_ckpt, "--data.init_args.fold=2", f"--ckpt_path={stage2_ckpt}"
    )
    for command in ("test", "predict"):
        with pytest.raises(CheckpointError, match=rf"^{command}: .*fold 2.*allow_class_overlap"):
            main([command, *args])
    main(["test", *args, "--model.init_args.allow_class_overlap=true"])
    res = json.loads((tmp_path / "fewshot-seg" / "run" / "results.json").read_text())
    overlap = res["provenance"]["class_overlap"]
    assert overlap["overlap_classes"] == [11, 12, 13, 14, 15] and res["provenance"]["allow_class_overlap"]
    assert res["fold"] == 2 and res["protocol"] == "spec" and len(res["episode_list_sha256"]) == 64


def test_stage2_checkpoint_is_self_contained(stage1_ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved_stage1.ckpt"
    shutil.copy(stage1_ckpt, moved)
    fit = main(["fit", *_stage2(synthetic_root, tmp_path / "fit", moved, "--trainer.max_steps=1")])
    stage2 = Path(fit.trainer.checkpoint_callback.last_model_path)
    moved.unlink()  # the stage-1 file is gone: test and predict need only the stage-2 checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = main(["test", *_stage2(synthetic_root, tmp_path / "test", moved, f"--ckpt_path={stage2}")])
    # The fit run's checkpoint bookkeeping is not restored into a test run (no "dirpath has changed").
    assert not [w for w in caught if "dirpath" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "test" / "fewshot-seg" / "run" / "results.json").is_file()
    for k, v in test.model.state_dict().items():
        assert torch.equal(v, torch.load(stage2, map_location="cpu", weights_only=True)["state_dict"][k]), k
    predict = [*_stage2(synthetic_root, tmp_path / "pred", moved, f"--ckpt_path={stage2}")]
    main(["predict", *predict, f"--model.init_args.predict_dir={tmp_path / 'png'}"])
    assert len(list((tmp_path / "png").glob("*_mask.png"))) == 4
    # Without --ckpt_path the missing stage-1 file is named; an untrained model is never scored.
    with pytest.raises(ValueError, match="does not exist") as err:  # jsonargparse wraps errors of __init__
        main(["test", *_stage2(synthetic_root, tmp_path / "t2", moved)])
    assert isinstance(user_error(err.value), CheckpointError)


def test_test_without_checkpoint_is_refused(stage1_ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"`test` needs trained MMModule weights: pass --ckpt_path"):
        main(["test", *_stage2(synthetic_root, tmp_path, stage1_ckpt)])
    stage1 = [
        *cfg("trainer.yaml", "data_synthetic.yaml", "stage1_pos_cpu_demo.yaml"),
        *tiny_data(synthetic_root),
    ]
    with pytest.raises(CheckpointError, match="needs trained POSModule weights"):
        main(["test", *stage1, *run_dir_args(tmp_path / "s1")])
