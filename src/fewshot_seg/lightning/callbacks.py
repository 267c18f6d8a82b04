"""Callbacks: freezing sub-modules (frozen backbone, frozen POS in stage 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.<path>`` with a readable error when the attribute path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(f"{type(root).__name__} has no sub-module {path!r}") from err


def freeze(module: nn.Module) -> None:
    """No gradients and inference behaviour (BatchNorm statistics untouched, dropout off)."""
    module.requires_grad_(False)
    module.eval()


class FreezeModules(pl.Callback):
    """Keeps the named sub-modules of the LightningModule frozen for the whole fit.

    Freezing means ``requires_grad=False`` for every parameter and the module in ``eval()`` mode.
    Eval mode matters for BatchNorm (or any norm with running statistics): in train mode it would
    keep updating its running mean/var from batch statistics even without gradients, silently
    changing the "frozen" backbone. Anything that puts the model back in train mode (Lightning
    before training, user code) is undone at the start of training, of every train epoch and of
    every train batch (a cheap flag check).

    Args:
        modules: attribute paths relative to the LightningModule, e.g. ``["backbone", "pos"]``.
    """

    def __init__(self, modules: Sequence[str] = ("backbone",)) -> None:
        super().__init__()
        self.modules = list(modules)

    def _targets(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        return [get_submodule(pl_module, p) for p in self.modules]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before configure_optimizers, so the frozen parameters never reach the optimiser.
        for m in self._targets(pl_module):
            freeze(m)

    def _enforce_eval(self, pl_module: pl.LightningModule) -> None:
        for m in self._targets(pl_module):
            if any(sub.training for sub in m.modules()):
                m.eval()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enforce_eval(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enforce_eval(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        self._enforce_eval(pl_module)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that by default monitors the module's own validation metric (max).

    ``monitor="auto"`` takes ``pl_module.monitor_metric`` (``val/oracle_miou`` in stage 1,
    ``val/miou`` in stage 2), so one trainer config serves both stages. ``last.ckpt`` is kept by
    default, for ``--ckpt_path last``. Metric names contain ``/``, so the file name does not embed them.
    """

    def __init__(
        self,
        monitor: str | None = "auto",
        mode: str = "max",
        save_last: bool = True,
        save_top_k: int = 1,
        filename: str = "best-step{step}",
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            filename=filename,
            auto_insert_metric_name=auto_insert_metric_name,
            **kwargs,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor == "auto":
            # Without a metric ModelCheckpoint keeps the latest checkpoint(s) instead.
            self.monitor = getattr(pl_module, "monitor_metric", None) or None
        super().setup(trainer, pl_module, stage)
