"""A user's own data through the real CLI: stage 1, stage 2, test, results by name, bad input in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import CONFIGS, OWN_DATA, cfg, run_dir_args
from PIL import Image

from datamodules.fake import MASK_FOLDER_CLASSES, make_fake_coco_format, make_fake_mask_folder
from fewshot_seg import cli
from fewshot_seg.cli import main
from fewshot_seg.lightning.provenance import CheckpointError  # the name on this branch and on main
from fewshot_seg.tools.aggregate import main as aggregate
from fewshot_seg.tools.train_fold import main as train_fold

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

SIZES = {"image_size": 64, "batch_size": 2, "num_workers": 0, "pool_min_pixels": 100, "val_episodes": 4}
TINY = [f"--data.init_args.{k}={v}" for k, v in {**SIZES, "test_episodes": 6}.items()]
STEPS = ["--trainer.max_steps=2", "--trainer.val_check_interval=2"]
FEW_POINTS = "--model.init_args.loss.num_points=256"  # stage 1's point-sampled mask loss, cheaper


def test_own_data_yamls_exist() -> None:
    assert all((CONFIGS / name).is_file() for name in OWN_DATA)


def _no_base_class_tested(results: dict, novel: dict[str, str]) -> None:
    """The test scored only the novel classes, named; its saved episode list holds only them."""
    assert results["class_names"] == novel and set(results["class_iou"]) == set(novel)
    episodes = json.loads(Path(results["episode_list"]).read_text())["episodes"]
    assert {str(c) for _, c, _ in episodes} == set(novel) and len(episodes) == 6


def test_coco_export_trains_and_tests_with_train_fold(tmp_path: Path, capsys) -> None:
    """``make train-fold DATA=<data_coco_format.yaml> STAGES=<demo stages>``, then ``aggregate --classes``."""
    root = make_fake_coco_format(tmp_path / "export")
    run = tmp_path / "run"
    out = train_fold(
        [
            "--data-config",
            str(CONFIGS / "data_coco_format.yaml"),
            "--stage-configs",
            "stage1_pos_cpu_demo.yaml",
            "stage2_mm_cpu_demo.yaml",
            "--data-root",
            str(root),
            "--run-dir",
            str(run),
            "--no-gpu",
            "--",
            "--data.init_args.novel_classes=[rust]",
            *TINY,
            *STEPS,
            "--trainer.enable_model_summary=false",
        ]
    )
    summary = json.loads(out.read_text())
    assert summary["dataset"] == "coco_format_instances_default_novel-" + summary["dataset"].rsplit("-", 1)[1]
    _no_base_class_tested(summary, {"4": "rust"})
    data = summary["provenance"]["data"]
    assert data["novel_classes"] == [4] and data["base_classes"] == [1, 2, 3]
    assert data["class_names"] == {"1": "scratch", "2": "dent", "3": "crack", "4": "rust"}
    assert data["class_ids"] == {"1": 3, "2": 17, "3": 42, "4": 300}
    trained = summary["provenance"]["model"]["trained_on"]
    assert trained["classes"] == [1, 2, 3] and trained["class_names"] == {
        "1": "scratch",
        "2": "dent",
        "3": "crack",
    }
    assert (run / "fewshot-seg" / "coco_format-fold0-seed0-stage2-1shot" / "done.json").is_file()
    capsys.readouterr()
    assert aggregate([str(run), "--classes"]) == 0
    table = capsys.readouterr().out
    assert "IoU % per class (model)" in table and f"| rust | {summary['class_iou']['4']:.2f} |" in table


def test_mask_folder_stage1_stage2_test(tmp_path: Path) -> None:
    root = make_fake_mask_folder(tmp_path / "masks")
    data = [*cfg("trainer.yaml", "data_mask_folder.yaml"), f"--data.init_args.root={root}", *TINY]
    data.append("--data.init_args.novel_classes=[vessel]")
    s1 = main(
        ["fit", *data, *cfg("stage1_pos_cpu_demo.yaml"), *STEPS, FEW_POINTS, *run_dir_args(tmp_path, "s1")]
    )
    stage1 = s1.trainer.checkpoint_callback.last_model_path
    s2_args = [*data, *cfg("stage2_mm_cpu_demo.yaml"), f"--model.init_args.stage1_checkpoint={stage1}"]
    # Another class split on the same stage-1 model: 'debris' was a training class, refused.
    leak = [*s2_args, "--data.init_args.novel_classes=[debris]", *STEPS, *run_dir_args(tmp_path, "leak")]
    with pytest.raises(CheckpointError, match="allow_class_overlap"):
        main(["fit", *leak])
    s2 = main(["fit", *s2_args, *STEPS, *run_dir_args(tmp_path, "s2")])
    assert s2.trainer.global_step == 2
    stage2 = s2.trainer.checkpoint_callback.last_model_path
    main(["test", *s2_args, *run_dir_args(tmp_path, "test"), f"--ckpt_path={stage2}"])
    results = json.loads((tmp_path / "fewshot-seg" / "test" / "results.json").read_text())
    _no_base_class_tested(results, {"4": "vessel"})
    assert results["provenance"]["data"]["class_names"]["1"] == MASK_FOLDER_CLASSES[0]


# ---- bad input: exit 2 and one line -------------------------------------------------------------------
def _console(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["fewshot-seg", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.entry_point()
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _edit_json(root: Path, edit) -> Path:
    ann = root / "annotations" / "instances_default.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return ann


def _rust_in_one_image(d: dict) -> None:
    rust = [a for a in d["annotations"] if a["category_id"] == 300]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 300 or a is rust[0]]


COCO_CASES = {
    "unknown novel name": (None, ["--data.init_args.novel_classes=[Rust]"], r"novel_classes: 'Rust' is not a "
                           r"class of {ann}.*\(did you mean 'rust'\?\)"),
    "too few images": (_rust_in_one_image, [], r"{ann} \(.*\) test class pool too small for 1-shot "
                       r"episodes .*: class 4 \(rust\): 1 images"),
    "missing image": ("img_003.jpg", [], r"{ann}: image '35' is missing: .*img_003.jpg not found"),
    "unknown category": (lambda d: d["annotations"][2].update(category_id=7), [],
                         r"{ann}: annotation 3 has unknown category 7"),
    "duplicate image id": (lambda d: d["images"].append({**d["images"][1], "file_name": "x.jpg"}), [],
                           r"{ann}: image id 15 is listed twice in 'images'"),
    "empty segmentation": (lambda d: d["annotations"][4].update(segmentation=[]), [],
                           r"{ann}: annotation 5 has an empty 'segmentation'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_coco_bad_input_is_one_line(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    import re

    root = make_fake_coco_format(tmp_path / "export")
    breaker, extra, pattern = COCO_CASES[case]
    ann = root / "annotations" / "instances_default.json"
    if isinstance(breaker, str):
        (root / "images" / breaker).unlink()
    elif breaker is not None:
        _edit_json(root, breaker)
    args = [*cfg("trainer.yaml", "data_coco_format.yaml", "stage1_pos_cpu_demo.yaml"), *TINY]
    args += [f"--data.init_args.root={root}", "--data.init_args.novel_classes=[rust]", *extra]
    code, err = _console(monkeypatch, capsys, "fit", *args, *run_dir_args(tmp_path), *STEPS)
    assert code == 2 and len(err) == 1, err
    assert re.match("error: " + pattern.format(ann=re.escape(str(ann))), err[0]), err[0]


def test_missing_image_skipped_when_asked(tmp_path: Path) -> None:
    """``missing_images: skip``: the other images train and test (a warning names the missing one)."""
    root = make_fake_coco_format(tmp_path / "export")
    (root / "images" / "img_003.jpg").unlink()
    args = [*cfg("trainer.yaml", "data_coco_format.yaml", "stage1_pos_cpu_demo.yaml"), *TINY, *STEPS]
    args += [f"--data.init_args.root={root}", "--data.init_args.novel_classes=[rust]"]
    with pytest.warns(UserWarning, match="img_003.jpg"):
        fit = main(["fit", *args, "--data.init_args.missing_images=skip", *run_dir_args(tmp_path)])
    assert fit.trainer.global_step == 2 and "35" not in fit.datamodule.source("train").ids


@pytest.mark.parametrize("case", ["unknown class", "mask value"])
def test_mask_folder_bad_input_is_one_line(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    root = make_fake_mask_folder(tmp_path / "masks")
    novel = "vessels" if case == "unknown class" else "vessel"
    if case == "mask value":
        label = np.zeros((48, 64), dtype=np.uint8)
        label[:4] = 9
        Image.fromarray(label, mode="L").save(root / "masks" / "s_005.png")
    args = [*cfg("trainer.yaml", "data_mask_folder.yaml", "stage1_pos_cpu_demo.yaml"), *TINY]
    args += [f"--data.init_args.root={root}", f"--data.init_args.novel_classes=[{novel}]"]
    code, err = _console(monkeypatch, capsys, "fit", *args, *run_dir_args(tmp_path), *STEPS)
    assert code == 2 and len(err) == 1, err
    if case == "unknown class":
        assert err[0].startswith(f"error: novel_classes: 'vessels' is not a class of {root / 'classes.txt'}")
        assert "(did you mean 'vessel'?)" in err[0]
    else:
        assert err[0] == f"error: label {root / 'masks' / 's_005.png'} holds values [9] outside {{0..4, 255}}"
