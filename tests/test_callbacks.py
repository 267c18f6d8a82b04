"""FreezeModules keeps frozen weights *and* BatchNorm statistics bit-identical through a fit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fewshot_seg.config import OptimizerConfig
from fewshot_seg.lightning.callbacks import BestCheckpoint, FreezeModules
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


class _Scored(pl.LightningModule):
    """Validation metric ``val/m`` follows ``scores`` (one value per validation)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.scores = list(scores)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/m", self.scores.pop(0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _checkpointed_fit(tmp_path, scores: list[float], steps: int, **kw) -> BestCheckpoint:
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    cb = BestCheckpoint(monitor="val/m", dirpath=str(tmp_path / "ckpt"), **kw)
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_Scored(scores), data, data)
    return cb


def test_last_checkpoint_is_the_latest_state_and_a_link_when_it_is_the_best(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    # Best at step 2, worse at step 4, stop at step 5: last.ckpt is step 5, the best stays step 2.
    _checkpointed_fit(tmp_path, [5.0, 1.0], steps=5)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best-step2.ckpt", "last.ckpt"]
    assert not (ckpt / "last.ckpt").is_symlink()
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 5
    # Best at the last validation step: last.ckpt is a link to it, not a second full copy.
    _checkpointed_fit(tmp_path / "b", [1.0, 5.0], steps=4)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "best-step4.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-step4.ckpt", "last.ckpt"]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _checkpointed_fit(tmp_path, [5.0, 1.0], steps=2)
    ckpt = tmp_path / "ckpt"
    before = (ckpt / "best-step2.ckpt").read_bytes()

    def crash(self, filepath, weights_only=False, storage_options=None):
        with open(filepath, "wb") as f:  # a half-written file, then the process dies
            f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("the disk died")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="the disk died"):
        _checkpointed_fit(tmp_path, [9.0], steps=2)
    # The interrupted save left only its temporary file; every real name still loads as before.
    assert (ckpt / "best-step2.ckpt").read_bytes() == before
    assert not any(p.name.startswith("best") and p.stat().st_size < 100 for p in ckpt.iterdir())


def test_a_kill_while_last_is_relinked_never_leaves_it_dangling(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    # Best at step 2 (last.ckpt -> best-step2.ckpt), a better one at step 4: killed while re-linking.
    real_symlink = os.symlink
    calls = []

    def killed(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:  # the second link: last.ckpt -> best-step4.ckpt
            raise RuntimeError("killed")
        return real_symlink(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _checkpointed_fit(tmp_path, [1.0, 5.0], steps=4)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists(), "last.ckpt dangles (its target was deleted before it was re-linked)"
    assert torch.load(last, weights_only=True)["global_step"] in (2, 4)
