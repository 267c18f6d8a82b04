"""The real POSModule / MMModule keep frozen weights *and* BatchNorm statistics bit-identical in a fit.

Tiny synthetic data (64 px), ResNet-18 without weights and a small POS; a few optimisation steps.
Stage 1 uses the paper setting ``backbone.freeze=True`` with ``backbone.frozen_bn=False``: real
``nn.BatchNorm2d`` layers with running statistics, which only the freezing callback (eval mode)
keeps from drifting - the control test shows they do drift without it. Stage 2 builds its
backbone/POS from the stage-1 checkpoint's saved settings alone (no sizes repeated).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from cli_helpers import GEN
from torch import Tensor, nn

from fewshot_seg.config import BackboneConfig, MaskMatchingConfig, OptimizerConfig, POSConfig, POSLossConfig
from fewshot_seg.lightning.mm_module import MMModule, Stage1CheckpointError
from fewshot_seg.lightning.pos_module import POSModule

# A small POS (ResNet-18, width 64, 20 queries) with few points: quick on a CPU.
SMALL_BACKBONE = BackboneConfig(name="resnet18", weights=None)
SMALL_POS = POSConfig(
    num_queries=20, dim=64, heads=4, enc_layers=2, enc_ffn=128, dec_layers=3, dec_ffn=256, norm_groups=8
)
SMALL_MM = dict(mm=MaskMatchingConfig(dim=32, heads=4, ffn=64, matching_hidden=16, kv_min_size=4))


@pytest.fixture(scope="module")
def datamodule(synthetic_root: Path):
    from datamodules import SyntheticDataModule

    return SyntheticDataModule(
        root=str(synthetic_root),
        image_size=64,
        batch_size=2,
        num_workers=0,
        pool_min_pixels=50,
        val_episodes=2,
        test_episodes=2,
        **GEN,
    )


def _fit(model: pl.LightningModule, dm, root: Path, steps: int) -> pl.Trainer:
    # Hostile start: everything in train mode (what Lightning < 2.2 did before fitting, and what user
    # code may do). Lightning 2.6 keeps the construction-time modes, which would hide a callback
    # that fails to put the frozen BatchNorm layers in eval mode.
    model.train()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == steps
    return trainer


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _items(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> Iterator[tuple[str, Tensor]]:
    return ((k, v) for k, v in state.items() if k.startswith(prefixes))


def _changed(before: dict[str, Tensor], after: dict[str, Tensor], prefix: str) -> list[str]:
    return [k for k, v in _items(before, (prefix,)) if not torch.equal(v, after[k])]


def _stage1_model() -> POSModule:
    torch.manual_seed(0)
    model = POSModule(
        backbone=BackboneConfig(name="resnet18", weights=None, freeze=True, frozen_bn=False),
        pos=SMALL_POS,
        loss=POSLossConfig(num_points=256),
        optim=OptimizerConfig(lr=1e-3),
    )
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    # The option under test: real BatchNorm with running statistics, not FrozenBatchNorm2d.
    assert bns and all(type(m) is nn.BatchNorm2d and m.track_running_stats for m in bns)
    return model


@pytest.fixture(scope="module")
def stage1(datamodule, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """Stage-1 fit (3 steps): state before, state after, and the saved checkpoint."""
    root = tmp_path_factory.mktemp("stage1")
    model = _stage1_model()
    before = _snapshot(model)
    trainer = _fit(model, datamodule, root, steps=3)
    ckpt = root / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)
    return before, _snapshot(model), ckpt


def test_stage1_frozen_backbone_and_bn_statistics_bit_identical(stage1) -> None:
    before, after, _ = stage1
    backbone = list(_items(before, ("backbone.",)))
    assert any(k.endswith("running_mean") for k, _ in backbone)
    for k, v in backbone:  # weights, running mean/var and num_batches_tracked
        assert torch.equal(v, after[k]), k
    # The POS did train.
    changed = _changed(before, after, "pos.")
    assert "pos.transformer_decoder.query_feat.weight" in changed
    assert len(changed) > len(list(_items(before, ("pos.",)))) // 2


def test_stage1_without_freeze_callback_bn_statistics_drift(datamodule, tmp_path: Path) -> None:
    # Control: the same fit without the module's FreezeModules callback. requires_grad=False alone
    # keeps the weights, but in train mode BatchNorm updates its running statistics: the drift the
    # test above would catch.
    model = _stage1_model()
    model.configure_callbacks = list  # type: ignore[method-assign]  # no callbacks
    before = _snapshot(model)
    _fit(model, datamodule, tmp_path, steps=1)
    after = model.state_dict()
    assert torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])


def test_stage2_frozen_backbone_and_pos_bit_identical(stage1, datamodule, tmp_path: Path) -> None:
    _, stage1_after, ckpt = stage1
    torch.manual_seed(0)
    # No backbone/POS size given: all taken from the stage-1 checkpoint.
    model = MMModule(stage1_checkpoint=str(ckpt), optim=OptimizerConfig(lr=1e-3), **SMALL_MM)
    assert model.hparams.pos == asdict(SMALL_POS)
    assert model.hparams.backbone["name"] == "resnet18"
    before = _snapshot(model)
    frozen = list(_items(before, ("backbone.", "pos.")))
    # Loaded from stage 1 (FrozenBatchNorm2d in stage 2 keeps no step counter).
    for k, v in frozen:
        assert torch.equal(v, stage1_after[k]), k
    trainer = _fit(model, datamodule, tmp_path, steps=2)
    after = _snapshot(model)
    for k, v in frozen:
        assert torch.equal(v, after[k]), k
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.pos.parameters())
    # Mask Matching did train.
    changed = _changed(before, after, "mm.")
    assert len(changed) > len(list(_items(before, ("mm.",)))) // 2

    # The stage-2 checkpoint records the resolved sizes (not None) and loads back as it was.
    s2 = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(s2)
    hp = torch.load(s2, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["pos"] == asdict(SMALL_POS) and hp["backbone"]["name"] == "resnet18"
    reloaded = MMModule.load_from_checkpoint(s2)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_stage2_takes_architecture_from_stage1_checkpoint(stage1, tmp_path: Path) -> None:
    _, _, ckpt = stage1
    # A setting equal to the recorded one is accepted; a different one is refused by name.
    MMModule(stage1_checkpoint=str(ckpt), pos=SMALL_POS, backbone=SMALL_BACKBONE, **SMALL_MM)
    with pytest.raises(Stage1CheckpointError, match=r"pos.enc_layers: 2 \(checkpoint\) vs 6 \(model\)"):
        MMModule(stage1_checkpoint=str(ckpt), pos=replace(SMALL_POS, enc_layers=6), **SMALL_MM)
    with pytest.raises(
        Stage1CheckpointError, match=r"backbone.name: 'resnet18' \(checkpoint\) vs 'resnet34'"
    ):
        MMModule(stage1_checkpoint=str(ckpt), backbone=BackboneConfig(name="resnet34"), **SMALL_MM)
    # A checkpoint that records no settings: the given sizes (or the paper's) are used, and a
    # mismatch surfaces as named shape errors.
    bare = torch.load(ckpt, map_location="cpu", weights_only=True)
    del bare["hyper_parameters"]
    bare_path = tmp_path / "bare.ckpt"
    torch.save(bare, bare_path)
    with pytest.raises(Stage1CheckpointError, match="shape mismatches"):
        MMModule(
            stage1_checkpoint=str(bare_path),
            backbone=SMALL_BACKBONE,
            pos=replace(SMALL_POS, dim=32),
            **SMALL_MM,
        )
    m = MMModule(stage1_checkpoint=str(bare_path), backbone=SMALL_BACKBONE, pos=SMALL_POS, **SMALL_MM)
    assert m.hparams.pos["dim"] == 64


def test_no_checkpoint_means_paper_architecture() -> None:
    from fewshot_seg.lightning.mm_module import resolve_architecture

    backbone, pos = resolve_architecture(None, None, None)
    assert pos.num_queries == 100 and pos.dim == 256 and backbone.name == "resnet50"
    # Overrides apply without a checkpoint (small backbone, no ImageNet download in tests).
    m = MMModule(stage1_checkpoint=None, backbone=SMALL_BACKBONE, pos=SMALL_POS, **SMALL_MM)
    assert m.hparams.pos["num_queries"] == 20 and m.pos.num_queries == 20
