"""The benchmark data files through the real CLI on tiny trees in their published layouts.

FSS-1000 and LVIS-92i train: ``fit`` (2 stage-1 steps) then ``test`` from the fit's checkpoint. Every
benchmark is tested with the synthetic demo checkpoint (another dataset: ``allow_class_overlap``),
writing a results.json with its dataset, protocol and classes; ``aggregate`` tables them. A COCO-20i
model tested on COCO -> Pascal reports no class overlap at its own fold and the shared classes at
another fold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import BENCHMARK_DATA, CONFIGS, cfg, run_dir_args

from datamodules.fake import (
    make_fake_chestxray,
    make_fake_coco,
    make_fake_deepglobe,
    make_fake_fss,
    make_fake_isic,
    make_fake_lvis,
    make_fake_voc,
)
from fewshot_seg.checkpoints import CheckpointError
from fewshot_seg.cli import main
from fewshot_seg.tools.aggregate import SUMMARY_KIND, collect, find_summaries, summary_name

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

SMALL = [
    "--data.init_args.image_size=64",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--data.init_args.val_episodes=2",
]
DATASET = {
    "data_fss1000.yaml": ("fss1000", "hsnet_fss"),
    "data_lvis92i.yaml": ("lvis92i", "lvis92i"),
    "data_coco2pascal.yaml": ("coco2pascal", "spec"),
    "data_deepglobe.yaml": ("deepglobe", "patnet"),
    "data_isic2018.yaml": ("isic2018", "patnet"),
    "data_chestxray.yaml": ("chestxray", "patnet"),
}


def test_benchmark_yamls_exist() -> None:
    assert sorted(DATASET) == sorted(BENCHMARK_DATA)
    assert all((CONFIGS / name).is_file() for name in BENCHMARK_DATA)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Data arguments per benchmark file: its tiny tree, small sizes, few episodes."""
    tmp = tmp_path_factory.mktemp("bench")
    few = "--data.init_args.test_episodes=4"
    return {
        # test_episodes stays null: one episode per test image (3 classes x 5 images)
        "data_fss1000.yaml": [f"--data.init_args.root={make_fake_fss(tmp / 'fss')}", *SMALL],
        "data_lvis92i.yaml": [
            f"--data.init_args.root={make_fake_lvis(tmp / 'lvis')}",
            "--data.init_args.train_pool_min_pixels=50",
            few,
            *SMALL,
        ],
        "data_coco2pascal.yaml": [f"--data.init_args.root={make_fake_voc(tmp / 'voc')}", few, *SMALL],
        "data_deepglobe.yaml": [f"--data.init_args.root={make_fake_deepglobe(tmp / 'dg')}", few, *SMALL],
        "data_isic2018.yaml": [f"--data.init_args.root={make_fake_isic(tmp / 'isic')}", few, *SMALL],
        "data_chestxray.yaml": [f"--data.init_args.root={make_fake_chestxray(tmp / 'cxr')}", few, *SMALL],
    }


def _results(out: Path, version: str) -> dict:
    return json.loads((out / "fewshot-seg" / version / "results.json").read_text())


def _check(res: dict, dm, data: str) -> None:
    name, protocol = DATASET[data]
    assert res["dataset"] == name == dm.name and res["protocol"] == protocol
    assert sorted(int(c) for c in res["class_iou"]) == dm.novel_classes
    assert sum(res["class_episodes"].values()) == len(dm.episode_list("test"))
    assert 0.0 <= res["miou"] <= 100.0 and len(res["episode_list_sha256"]) == 64


@pytest.mark.parametrize("data", ["data_fss1000.yaml", "data_lvis92i.yaml"])
def test_trainable_benchmarks_fit_and_test(data: str, roots: dict, tmp_path: Path) -> None:
    args = [*cfg("trainer.yaml", data, "stage1_pos_cpu_demo.yaml"), *roots[data]]
    args.append("--model.init_args.loss.num_points=256")
    fit = main(
        [
            "fit",
            *args,
            *run_dir_args(tmp_path, "fit"),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
        ]
    )
    assert fit.trainer.global_step == 2
    assert math.isfinite(float(fit.trainer.callback_metrics["train/loss"]))
    last = Path(fit.trainer.checkpoint_callback.last_model_path)
    test = main(["test", *args, *run_dir_args(tmp_path, "test"), f"--ckpt_path={last}"])
    res = _results(tmp_path, "test")
    _check(res, test.datamodule, data)
    assert res["provenance"]["class_overlap"]["overlap_classes"] == []  # same dataset and fold
    if data == "data_fss1000.yaml":
        assert sum(res["class_episodes"].values()) == 15  # every test image once


@pytest.mark.parametrize("data", BENCHMARK_DATA)
def test_every_benchmark_tests_the_demo_checkpoint(
    data: str, roots: dict, stage1_ckpt: Path, stage2_ckpt: Path, tmp_path: Path
) -> None:
    args = [
        *cfg("trainer.yaml", data, "stage2_mm_cpu_demo.yaml"),
        *roots[data],
        *run_dir_args(tmp_path, "test"),
        f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
        f"--ckpt_path={stage2_ckpt}",
    ]
    with pytest.raises(CheckpointError, match="allow_class_overlap"):  # trained on 'synthetic'
        main(["test", *args])
    test = main(["test", *args, "--model.init_args.allow_class_overlap=true"])
    res = _results(tmp_path, "test")
    _check(res, test.datamodule, data)
    assert res["stage"] == "mm" and res["provenance"]["allow_class_overlap"]
    overlap = res["provenance"]["class_overlap"]
    assert overlap["trained_dataset"] == "synthetic" and overlap["overlap_classes"] == []
    # As a fold summary (what train_fold writes), it is one row of the results table.
    (tmp_path / summary_name(res["shot"])).write_text(json.dumps({**res, "kind": SUMMARY_KIND, "seed": 0}))
    rows = collect(find_summaries([tmp_path]))
    assert [(r["dataset"], r["protocol"]) for r in rows] == [DATASET[data]]


@pytest.fixture(scope="module")
def coco_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of a 1-step stage-1 fit on COCO-20i fold 0 (fake COCO with the real class names)."""
    tmp = tmp_path_factory.mktemp("coco_model")
    coco = make_fake_coco(tmp / "coco", per_class=2, real_names=True)
    args = [
        *cfg("trainer.yaml", "data_coco.yaml", "stage1_pos_cpu_demo.yaml"),
        f"--data.init_args.root={coco}",
        *SMALL,
        "--data.init_args.test_episodes=2",
        "--model.init_args.loss.num_points=256",
        *run_dir_args(tmp, "fit"),
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
    ]
    return Path(main(["fit", *args]).trainer.checkpoint_callback.last_model_path)


def _coco2pascal_overlap(roots: dict, model: Path, fold: int, out: Path) -> dict:
    main(
        [
            "test",
            *cfg("trainer.yaml", "data_coco2pascal.yaml", "stage1_pos_cpu_demo.yaml"),
            *roots["data_coco2pascal.yaml"],
            f"--data.init_args.fold={fold}",
            *run_dir_args(out, "test"),
            f"--ckpt_path={model}",
            "--model.init_args.allow_class_overlap=true",
        ]
    )
    report = _results(out, "test")["provenance"]["class_overlap"]
    assert report["trained_dataset"].startswith("coco20i") and report["trained_fold"] == 0
    assert report["tested_dataset"] == "coco2pascal" and report["tested_fold"] == fold
    return report


def test_coco_model_at_another_fold_reports_the_shared_classes(
    roots: dict, coco_model: Path, tmp_path: Path
) -> None:
    # COCO fold 0 trained on bicycle, bus, horse, couch: the Pascal classes of coco2pascal fold 1.
    report = _coco2pascal_overlap(roots, coco_model, 1, tmp_path)
    assert report["overlap_classes"] == [2, 6, 13, 18]
    assert report["overlap_names"] == ["bicycle", "bus", "horse", "couch"]


def test_coco_model_at_its_fold_reports_no_overlap(roots: dict, coco_model: Path, tmp_path: Path) -> None:
    assert _coco2pascal_overlap(roots, coco_model, 0, tmp_path)["overlap_classes"] == []
