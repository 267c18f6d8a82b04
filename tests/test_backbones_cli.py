"""timm backbones through the real CLI on tiny synthetic data (CPU, random init).

* ``--model.init_args.backbone.name=timm:convnext_atto`` (hierarchical, ``features_only``) and
  ``timm:vit_small_patch14_dinov2`` (plain ViT + simple feature pyramid) each run stage 1, stage 2 and
  ``test`` and write results.json; the stage-2 checkpoint alone rebuilds the model (self-contained).
* Every ``backbone_<name>.yaml`` parses as written, composed after a stage file, and runs ``fit`` with
  ``fast_dev_run`` with its name replaced by a tiny model of the same family (``BACKBONE_CONFIGS``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import BACKBONE_CONFIGS, CONFIGS, STAGE1, STAGE2, cfg, run_dir_args, tiny_data

from fewshot_seg import Segmenter
from fewshot_seg.cli import main

FAST = ["--model.init_args.loss.num_points=256", "--model.init_args.pos.num_queries=8"]


@pytest.mark.parametrize("name", ["timm:convnext_atto", "timm:vit_small_patch14_dinov2"])
def test_timm_backbone_stage1_stage2_test(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    data = tiny_data(synthetic_root)
    steps = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    s1 = main(
        [
            "fit",
            *STAGE1,
            *data,
            *run_dir_args(tmp_path, "s1"),
            *steps,
            *FAST,
            f"--model.init_args.backbone.name={name}",
        ]
    )
    assert s1.trainer.global_step == 2
    ckpt1 = Path(s1.trainer.checkpoint_callback.last_model_path)
    assert (
        torch.load(ckpt1, map_location="cpu", weights_only=True)["hyper_parameters"]["backbone"]["name"]
        == name
    )

    s2_args = [*STAGE2, *data, f"--model.init_args.stage1_checkpoint={ckpt1}"]
    s2 = main(["fit", *s2_args, *run_dir_args(tmp_path, "s2"), *steps])
    assert s2.trainer.global_step == 2
    assert s2.model.hparams.backbone["name"] == name
    ckpt2 = Path(s2.trainer.checkpoint_callback.last_model_path)

    # The stage-1 file is gone: the stage-2 checkpoint alone rebuilds and scores the model.
    ckpt1.unlink()
    test = main(["test", *s2_args, *run_dir_args(tmp_path, "t"), f"--ckpt_path={ckpt2}"])
    saved = torch.load(ckpt2, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in test.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    res = json.loads((tmp_path / "fewshot-seg" / "t" / "results.json").read_text())
    assert res["stage"] == "mm" and 0.0 <= res["miou"] <= 100.0
    assert res["oracle_miou"] is not None and res["baseline_miou"] is not None

    # The Segmenter rebuilds the same network from the checkpoint (feature pyramid included).
    seg = Segmenter.from_checkpoint(ckpt2, device="cpu")
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 1
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    (out,) = seg.segment([image[:40]], seg.encode_supports([image], [mask]))
    assert out.shape == (40, 70)
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, saved[f"backbone.{k}"]), k


@pytest.mark.parametrize("backbone_yaml", sorted(BACKBONE_CONFIGS))
def test_backbone_yaml_parses_and_fast_dev_runs(
    backbone_yaml: str, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    written = yaml.safe_load((CONFIGS / backbone_yaml).read_text())["model"]["init_args"]["backbone"]
    for stage in ("stage1_pos.yaml", "stage2_mm.yaml"):
        with pytest.raises(SystemExit) as exc:
            main(["fit", *cfg("trainer.yaml", "data_synthetic.yaml", stage, backbone_yaml), "--print_config"])
        assert exc.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["backbone"]["name"] == written["name"]

    tiny = BACKBONE_CONFIGS[backbone_yaml]
    assert tiny.startswith("timm:") == written["name"].startswith("timm:")  # same source
    cli = main(
        [
            "fit",
            *cfg("trainer.yaml", "data_synthetic.yaml", "stage1_pos_cpu_demo.yaml", backbone_yaml),
            *tiny_data(synthetic_root),
            *run_dir_args(tmp_path),
            *FAST,
            f"--model.init_args.backbone.name={tiny}",
            "--model.init_args.backbone.weights=null",  # no download in tests
            "--trainer.fast_dev_run=1",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.backbone["freeze"] == written["freeze"]
