"""FreezeModules keeps frozen weights *and* BatchNorm statistics bit-identical through a fit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fewshot_seg.config import OptimizerConfig
from fewshot_seg.lightning.callbacks import FreezeModules
from fewshot_seg.lightning.optim import build_optimizer


class _Toy(pl.LightningModule):
    """A backbone with BatchNorm + a head; it forces train mode every epoch, as a hostile Trainer could."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))

    def on_train_epoch_start(self) -> None:
        self.train()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.head(self.backbone(x)).pow(2).mean()

    def configure_optimizers(self):
        return build_optimizer(self, OptimizerConfig(lr=1e-2), max_steps=100)


def _fit(callbacks: list[pl.Callback], tmp_path) -> tuple[_Toy, dict, dict]:
    torch.manual_seed(0)
    model = _Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(TensorDataset(torch.randn(8, 3, 6, 6) * 3 + 1), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return model, before, model.state_dict()


def test_frozen_backbone_bit_identical(tmp_path) -> None:
    model, before, after = _fit([FreezeModules(["backbone"])], tmp_path)
    for k in before:
        if k.startswith("backbone."):
            assert torch.equal(before[k], after[k]), k
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # The head did train (weights and BN statistics moved).
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])
    assert not torch.equal(before["head.1.running_mean"], after["head.1.running_mean"])
    assert int(after["backbone.1.num_batches_tracked"]) == 0


def test_without_callback_bn_statistics_drift(tmp_path) -> None:
    # Control: freezing requires_grad alone is not enough; BN running stats still move.
    torch.manual_seed(0)
    _, before, after = _fit([], tmp_path)
    assert not torch.equal(before["backbone.1.running_mean"], after["backbone.1.running_mean"])


def test_unknown_module_path_is_named(tmp_path) -> None:
    cb = FreezeModules(["backbone", "pos"])
    with pytest.raises(AttributeError, match="'pos'"):
        cb.setup(None, _Toy(), "fit")  # type: ignore[arg-type]
