"""Every YAML of lightning_configs/ through the real CLI: fit, then test from the fit's checkpoint.

The data files run on tiny trees in their real on-disk formats (synthetic, fake VOC, fake COCO) with
the demo-size stage files; the paper-size stage files run too (slow); only the GPU trainer file is
parsed alone (no GPU in CI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import BACKBONE_CONFIGS, BENCHMARK_DATA, CONFIGS, OWN_DATA, cfg, run_dir_args, tiny_data

from datamodules.fake import make_fake_coco, make_fake_voc
from fewshot_seg.cli import main

ALL_YAML = sorted(p.name for p in CONFIGS.glob("*.yaml"))
DEMO_STAGES = ["stage1_pos_cpu_demo.yaml", "stage2_mm_cpu_demo.yaml"]
PAPER_STAGES = ["stage1_pos.yaml", "stage2_mm.yaml"]
DATA = ["data_synthetic.yaml", "data_pascal.yaml", "data_coco.yaml"]
# No GPU in CI: parsed and validated only.
PARSE_ONLY = {
    "trainer_gpu.yaml": [
        "trainer.yaml",
        "trainer_gpu.yaml",
        "data_synthetic.yaml",
        "stage1_pos_cpu_demo.yaml",
    ],
    "trainer_ddp.yaml": [
        "trainer.yaml",
        "trainer_gpu.yaml",
        "trainer_ddp.yaml",
        "data_pascal.yaml",
        "stage1_pos.yaml",
    ],
}
SMALL = [
    "--data.init_args.image_size=64",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--data.init_args.val_episodes=2",
    "--data.init_args.test_episodes=6",
]


def test_every_yaml_is_covered() -> None:
    # BENCHMARK_DATA: fit / test through the real CLI in test_benchmark_configs.py; BACKBONE_CONFIGS:
    # parsed and run with fast_dev_run in test_backbones_cli.py; OWN_DATA: test_own_data_cli.py.
    covered = {
        "trainer.yaml",
        *DATA,
        *BENCHMARK_DATA,
        *OWN_DATA,
        *BACKBONE_CONFIGS,
        *DEMO_STAGES,
        *PAPER_STAGES,
        *PARSE_ONLY,
    }
    assert set(ALL_YAML) == covered, "a new YAML needs a test here"


@pytest.fixture(scope="module")
def roots(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Data arguments per data file: the tiny tree it reads."""
    tmp = tmp_path_factory.mktemp("data")
    return {
        "data_synthetic.yaml": tiny_data(synthetic_root),
        "data_pascal.yaml": [f"--data.init_args.root={make_fake_voc(tmp / 'voc', per_class=3)}", *SMALL],
        "data_coco.yaml": [f"--data.init_args.root={make_fake_coco(tmp / 'coco', per_class=2)}", *SMALL],
    }


def _fit_then_test(data: str, stage: str, data_args: list[str], tmp: Path, extra: list[str]) -> dict:
    """Fit 2 steps, test the last checkpoint; check what each run must produce; return results.json."""
    args = [*cfg(stage, data, "trainer.yaml"), *data_args, *extra]  # order does not matter
    fit = main(
        ["fit", *args, *run_dir_args(tmp, "fit"), "--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    )
    assert fit.trainer.global_step == 2
    assert math.isfinite(float(fit.trainer.callback_metrics["train/loss"]))
    last = Path(fit.trainer.checkpoint_callback.last_model_path)
    assert last.is_file() and (last.parent.parent / "config.yaml").is_file()

    test = main(["test", *args, *run_dir_args(tmp, "test"), f"--ckpt_path={last}"])
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in test.model.state_dict().items():  # the test scored the fitted weights
        assert torch.equal(v, saved[k]), k
    res = json.loads((tmp / "fewshot-seg" / "test" / "results.json").read_text())
    dm = test.datamodule
    assert res["dataset"] == dm.name and res["fold"] == dm.fold and res["shot"] == dm.shot
    assert sorted(int(c) for c in res["class_iou"]) == dm.novel_classes
    assert sum(res["class_episodes"].values()) == dm.test_episodes
    assert 0.0 <= res["miou"] <= 100.0
    return res


@pytest.mark.parametrize("data", DATA)
def test_data_and_demo_stages_fit_and_test(data: str, roots: dict, tmp_path: Path) -> None:
    res1 = _fit_then_test(
        data, DEMO_STAGES[0], roots[data], tmp_path / "s1", ["--model.init_args.loss.num_points=256"]
    )
    assert res1["stage"] == "pos" and res1["baseline_miou"] is None
    last = next((tmp_path / "s1" / "fewshot-seg" / "fit" / "checkpoints").glob("last.ckpt"))
    res2 = _fit_then_test(
        data, DEMO_STAGES[1], roots[data], tmp_path / "s2", [f"--model.init_args.stage1_checkpoint={last}"]
    )
    assert res2["stage"] == "mm"
    for key in ("oracle_miou", "baseline_miou", "oracle_class_iou", "baseline_class_iou"):
        assert res2[key] is not None, key


@pytest.mark.slow
def test_paper_stages_fit_and_test(synthetic_root: Path, tmp_path: Path) -> None:
    # Paper-size ResNet-50 + POS on CPU; no ImageNet download in tests.
    data = tiny_data(synthetic_root)
    extra = ["--model.init_args.backbone.weights=null", "--model.init_args.loss.num_points=256"]
    _fit_then_test("data_synthetic.yaml", PAPER_STAGES[0], data, tmp_path / "s1", extra)
    last = tmp_path / "s1" / "fewshot-seg" / "fit" / "checkpoints" / "last.ckpt"
    _fit_then_test(
        "data_synthetic.yaml",
        PAPER_STAGES[1],
        data,
        tmp_path / "s2",
        [f"--model.init_args.stage1_checkpoint={last}"],
    )


@pytest.mark.parametrize("name", sorted(PARSE_ONLY))
def test_parse_only_configs(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *cfg(*PARSE_ONLY[name]), "--print_config"], run=True)
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed
    if name == "trainer_gpu.yaml":
        assert "bf16-mixed" in printed
    if name == "trainer_ddp.yaml":
        assert "strategy: ddp" in printed and "devices: -1" in printed


def test_no_wandb_mode_in_any_yaml() -> None:
    # The environment decides W&B's mode, never a config file.
    for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("sweeps/*.yaml")]:
        text = p.read_text()
        assert "WANDB_MODE" not in text.replace("WANDB_MODE says", "") and "offline:" not in text, p.name


def test_config_order_does_not_matter(capsys: pytest.CaptureFixture) -> None:
    printed = []
    for order in (
        ("trainer.yaml", "data_pascal.yaml", "stage2_mm.yaml"),
        ("stage2_mm.yaml", "data_pascal.yaml", "trainer.yaml"),
        ("data_pascal.yaml", "stage2_mm.yaml", "trainer.yaml"),
    ):
        with pytest.raises(SystemExit):
            main(["fit", *cfg(*order), "--print_config"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] == printed[2]
    assert "batch_size: 4" in printed[0]  # stage 2's global batch
