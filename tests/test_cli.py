"""End-to-end: the real CLI (in-process) on tiny synthetic data - both stages, resume, test, predict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from cli_helpers import STAGE2, cfg, run_dir_args, tiny_data
from PIL import Image

from fewshot_seg.checkpoints import STAGE_KEY
from fewshot_seg.cli import main
from fewshot_seg.config import MaskMatchingConfig, POSConfig
from fewshot_seg.lightning.mm_module import MMModule, Stage1CheckpointError


def test_stage1_checkpoint_and_run_folder(stage1_ckpt: Path) -> None:
    ckpt = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)
    assert ckpt[STAGE_KEY] == "pos"
    assert any(k.startswith("pos.") for k in ckpt["state_dict"])
    run = stage1_ckpt.parent.parent  # <save_dir>/<project>/<version>/checkpoints/last.ckpt
    assert run.name == "s1"
    assert (run / "config.yaml").is_file()
    # Stage 1 monitors the oracle; the best checkpoint is kept next to last.ckpt.
    assert list(stage1_ckpt.parent.glob("best-step*.ckpt"))
    # The demo trains its backbone: every parameter (backbone and POS) is in the optimiser.
    assert ckpt["hyper_parameters"]["backbone"]["name"] == "resnet18"
    optimised = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert optimised == len(
        [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and "running" not in k]
    )


def test_stage2_fit_resume_and_test(stage1_ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    common = [
        *STAGE2,
        *tiny_data(synthetic_root),
        *run_dir_args(tmp_path, "s2"),
        f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
        "--trainer.limit_val_batches=1",
    ]
    cli = main(["fit", *common, "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    assert cli.trainer.global_step == 1
    s1 = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    after = cli.model.state_dict()
    # Backbone + POS are the stage-1 weights, untouched by stage-2 training.
    for k in (
        "pos.transformer_decoder.query_feat.weight",
        "backbone.conv1.weight",
        "backbone.bn1.running_mean",
    ):
        assert torch.equal(s1[k], after[k]), k
    assert not any(p.requires_grad for p in cli.model.backbone.parameters())
    assert not any(p.requires_grad for p in cli.model.pos.parameters())
    # Frozen stage-1 pieces are never in the optimiser: exactly the Mask Matching parameters are.
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in cli.model.mm.parameters()}

    # Resume the same run (same logger version -> same checkpoint folder) from last.ckpt.
    cli2 = main(
        ["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=1", "--ckpt_path=last"]
    )
    assert cli2.trainer.global_step == 2
    last = Path(cli2.trainer.checkpoint_callback.last_model_path)
    assert torch.load(last, map_location="cpu", weights_only=True)[STAGE_KEY] == "mm"

    out = tmp_path / "test"
    main(
        [
            "test",
            *STAGE2,
            *tiny_data(synthetic_root),
            *run_dir_args(out, "t"),
            f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
            f"--ckpt_path={last}",
        ]
    )
    res = json.loads((out / "fewshot-seg" / "t" / "results.json").read_text())
    for key in (
        "miou",
        "fbiou",
        "oracle_miou",
        "baseline_miou",
        "class_iou",
        "wall_time_s",
        "fold",
        "shot",
        "dataset",
    ):
        assert key in res, key
    assert res["fold"] == 0 and res["shot"] == 1 and res["dataset"] == "synthetic"
    assert sorted(res["class_iou"]) == ["1", "2", "3", "4", "5"]
    assert sum(res["class_episodes"].values()) == 4
    assert 0.0 <= res["miou"] <= 100.0 and 0.0 <= res["oracle_miou"] <= 100.0
    csv_lines = (out / "fewshot-seg" / "t" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("class_id") and csv_lines[-1].startswith("mean")

    # A stage-2 checkpoint where stage 1 is expected: refused, naming the problem.
    with pytest.raises(Stage1CheckpointError, match="stage-2"):
        MMModule(stage1_checkpoint=str(last), mm=SMALL_MM)


SMALL_MM = MaskMatchingConfig(dim=32, matching_hidden=16)


def _recorded_pos(ckpt: Path) -> POSConfig:
    """The checkpoint's own POS settings (whatever the demo YAML says)."""
    return POSConfig(**torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["pos"])


def test_stage2_refuses_wrong_shapes(stage1_ckpt: Path) -> None:
    # The stage-1 run's settings are recorded in its checkpoint: a different one is refused by name.
    pos = _recorded_pos(stage1_ckpt)
    wrong = rf"pos.dim: {pos.dim} \(checkpoint\) vs {pos.dim // 2} \(model\)"
    with pytest.raises(Stage1CheckpointError, match=wrong):
        MMModule(stage1_checkpoint=str(stage1_ckpt), pos=replace(pos, dim=pos.dim // 2), mm=SMALL_MM)
    with pytest.raises(Stage1CheckpointError, match="backbone"):
        MMModule(stage1_checkpoint=str(stage1_ckpt), backbone={"name": "resnet34"}, mm=SMALL_MM)
    with pytest.raises(Stage1CheckpointError, match="does not exist"):
        MMModule(stage1_checkpoint="/nonexistent/last.ckpt", mm=SMALL_MM)
    # The right sizes load.
    MMModule(stage1_checkpoint=str(stage1_ckpt), pos=pos, mm=SMALL_MM)


def test_stage2_cli_names_wrong_checkpoint(stage1_ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    # jsonargparse re-raises instantiation errors as ValueError (Stage1CheckpointError is one) with our text.
    n = _recorded_pos(stage1_ckpt).num_queries
    with pytest.raises(ValueError, match=rf"pos.num_queries: {n} \(checkpoint\) vs {n + 1} \(model\)"):
        main(
            [
                "fit",
                *STAGE2,
                *tiny_data(synthetic_root),
                *run_dir_args(tmp_path),
                f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
                f"--model.init_args.pos.num_queries={n + 1}",
                "--trainer.fast_dev_run=true",
            ]
        )


def test_predict_writes_masks_and_overlays(
    stage1_ckpt: Path, stage2_ckpt: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    # A user folder: one support with its mask, two queries (one without a mask).
    folder = tmp_path / "episode"
    for d in ("supports", "queries"):
        (folder / d).mkdir(parents=True)
    imgs = sorted((synthetic_root / "JPEGImages").glob("*.jpg"))[:3]
    labels = synthetic_root / "SegmentationClassAug"
    lab = np.array(Image.open(labels / f"{imgs[0].stem}.png"))
    cls = int(next(v for v in np.unique(lab) if v not in (0, 255)))
    Image.open(imgs[0]).save(folder / "supports" / "s0.jpg")
    Image.fromarray(((lab == cls) * 255).astype(np.uint8)).save(folder / "supports" / "s0_mask.png")
    for i, p in enumerate(imgs[1:]):
        Image.open(p).save(folder / "queries" / f"q{i}.jpg")
    pred_dir = tmp_path / "pred"
    # Config order does not matter: the stage file sets nothing of the data.
    main(
        [
            "predict",
            *cfg("stage2_mm_cpu_demo.yaml", "trainer.yaml"),
            "--data=datamodules.FolderEpisodeDataModule",
            *run_dir_args(tmp_path / "runs"),
            f"--data.root={folder}",
            "--data.image_size=64",
            f"--model.init_args.stage1_checkpoint={stage1_ckpt}",
            f"--model.init_args.predict_dir={pred_dir}",
            f"--ckpt_path={stage2_ckpt}",
        ]
    )
    for i, p in enumerate(imgs[1:]):
        size = Image.open(p).size
        masks = list(pred_dir.glob(f"q{i}*_mask.png"))
        overlays = list(pred_dir.glob(f"q{i}*_overlay.png"))
        assert len(masks) == 1 and len(overlays) == 1
        mask = Image.open(masks[0])
        assert mask.size == size and set(np.unique(np.array(mask))) <= {0, 255}
        ov = Image.open(overlays[0])
        assert ov.size == size and ov.mode == "RGB"


def test_console_script_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # setuptools' console-script wrapper does sys.exit(<return value>): returning the CLI object
    # would print it and exit with status 1 after a successful run.
    import configparser

    import fewshot_seg.cli as cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "main", lambda *a, **k: calls.append(1) or object())
    assert cli.entry_point() is None
    assert calls == [1]
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert "fewshot_seg.cli:entry_point" in cfg["options.entry_points"]["console_scripts"]


class ProgressBarNotes(pl.Callback):
    """A callback whose name says ProgressBar but that is none: kept when the bar is turned off."""


def test_config_entries_are_recognised_by_class() -> None:
    from pytorch_lightning.callbacks import ProgressBar

    from fewshot_seg.cli import _configures

    assert _configures({"class_path": "fewshot_seg.lightning.StepProgressBar"}, ProgressBar)
    assert _configures({"class_path": "pytorch_lightning.callbacks.TQDMProgressBar"}, ProgressBar)
    assert not _configures({"class_path": f"{__name__}.ProgressBarNotes"}, ProgressBar)  # was by substring


def test_private_lightning_hook_we_override_is_still_called() -> None:
    """``FewShotCLI._parse_ckpt_path`` overrides a private LightningCLI method (no public hook replaces the
    stock one, which re-applies every saved hyper-parameter): the pinned Lightning must still call it after
    parsing and before the classes are built."""
    import inspect

    from pytorch_lightning.cli import LightningCLI

    source = inspect.getsource(LightningCLI.__init__)
    parse, ckpt, build = (
        source.index("self.parse_arguments("),
        source.index("self._parse_ckpt_path()"),
        source.index("self.before_instantiate_classes()"),
    )
    assert parse < ckpt < build
