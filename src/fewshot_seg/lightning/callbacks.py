"""Callbacks: frozen sub-modules, checkpoints, learning-rate logging and a step-counting progress bar."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from torch import nn

from fewshot_seg.lightning.finite import check_weights
from fewshot_seg.models.freezing import freeze


class FreezeModules(pl.Callback):
    """Keeps the named sub-modules of the LightningModule frozen for the whole fit.

    Frozen means ``requires_grad=False`` and ``eval()`` (see ``models.freezing.freeze``). Anything that
    puts the model back in train mode (Lightning before training, user code) is undone at the start
    of training, of every train epoch and of every train batch (a cheap flag check).

    Args:
        modules: attribute paths relative to the LightningModule, e.g. ``["backbone", "pos"]``.
    """

    def __init__(self, modules: Sequence[str] = ("backbone",)) -> None:
        super().__init__()
        self.modules = list(modules)

    def _targets(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        targets = []
        for path in self.modules:
            try:
                targets.append(pl_module.get_submodule(path))
            except AttributeError as err:
                raise AttributeError(f"{type(pl_module).__name__} has no sub-module {path!r}") from err
        return targets

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
    """``ModelCheckpoint`` for this project's runs: the stage's own metric, ``last.ckpt``, atomic files.

    * ``monitor="auto"`` takes ``pl_module.monitor_metric`` (``val/oracle_miou`` in stage 1, ``val/miou``
      in stage 2), so one trainer config serves both stages; metric names contain ``/``, so file names
      do not embed them.
    * ``last.ckpt`` (for ``--ckpt_path last``) holds the state of the latest validation and of the end
      of training, whether or not the metric improved (Lightning >= 2.5 refreshes it only with a new
      top-k file). When the best checkpoint was written at the same step, ``last.ckpt`` is a symbolic
      link to it instead of a second full copy (unlike Lightning's ``save_last="link"``, never a link to
      an *older* step's file).
    * Every file is written under a temporary name and renamed into place, so a run killed while
      saving never leaves a truncated checkpoint under a real name.
    """

    def __init__(
        self,
        monitor: str | None = "auto",
        mode: str = "max",
        save_last: bool = True,
        save_top_k: int = 1,
        filename: str = "best-step{step}",
        auto_insert_metric_name: bool = False,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        # No version counter: a resumed run rewrites its own last.ckpt instead of starting last-v1.ckpt.
        super().__init__(
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            filename=filename,
            auto_insert_metric_name=auto_insert_metric_name,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self._deferred: list[str] = []  # files to remove once last.ckpt no longer links to them
        self.resuming = False  # set by the CLI for `fit --ckpt_path ...` (Lightning restores after setup)
        self._stage = "fit"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor == "auto":
            # Without a metric ModelCheckpoint keeps the latest checkpoint(s) instead.
            self.monitor = getattr(pl_module, "monitor_metric", None) or None
        self._stage = stage
        with warnings.catch_warnings():
            if self.resuming:
                # A resumed run writes into its own folder: the files there are its earlier checkpoints.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # test / validate / predict write no checkpoints: the fit run's best/last bookkeeping (and its
        # folder, which Lightning would warn has changed) only matters to a resumed fit.
        if self._stage == "fit":
            super().load_state_dict(state_dict)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)  # skipped when a top-k file (and last) was just saved at this step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)  # the final weights, also when the last step was not a validation step
        self._remove_deferred(trainer)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Diverged weights are never written (over a good last.ckpt, or as a "best"): the run stops.
        check_weights(trainer.lightning_module, trainer.global_step, os.path.basename(filepath))
        folder, name = os.path.split(filepath)
        tmp = os.path.join(folder, f".{name}.partial")
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)  # same folder: atomic; replaces a link to last.ckpt, not its target
        trainer.strategy.barrier("checkpoint-rename")
        self._last_checkpoint_saved = filepath

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if not self.save_last:
            return
        same_step = self._last_checkpoint_saved and self._last_global_step_saved == trainer.global_step
        if not same_step:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        else:
            filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            previous, self.last_model_path = self.last_model_path, filepath
            self._link_checkpoint(trainer, self._last_checkpoint_saved, filepath)
            if (
                previous
                and previous != filepath
                and self._should_remove_checkpoint(trainer, previous, filepath)
            ):
                self._remove_checkpoint(trainer, previous)
        self._remove_deferred(trainer)  # last.ckpt is in place: the file it used to link to may go

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # The old best file that last.ckpt still links to is removed only after last.ckpt is re-linked
        # (Lightning removes it first: a kill in between left last.ckpt dangling).
        last = self.last_model_path
        if last and os.path.islink(last) and os.path.realpath(last) == os.path.realpath(filepath):
            self._deferred.append(filepath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _remove_deferred(self, trainer: pl.Trainer) -> None:
        pending, self._deferred = self._deferred, []
        for filepath in pending:
            self._remove_checkpoint(trainer, filepath)  # deferred again if last.ckpt still links to it

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """``linkpath`` -> ``filepath`` as a relative symbolic link, replaced atomically (never missing)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            folder, name = os.path.split(linkpath)
            tmp = os.path.join(folder, f".{name}.link-partial")
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, folder), tmp)
            except OSError:  # no symbolic links (Windows without the right): a copy, renamed into place
                shutil.copy(filepath, tmp)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier()


class LearningRateLogger(LearningRateMonitor):
    """``LearningRateMonitor`` that is silent without a logger (``--trainer.logger=false``)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_active", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_active", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class StepProgressBar(TQDMProgressBar):
    """tqdm bars whose training bar counts optimisation steps up to ``max_steps``, across epochs.

    In step-based training an epoch is an arbitrary slice of an endless episode stream; the bar
    shows ``step / max_steps`` instead. Each bar refreshes about ``updates`` times, so a 40-step run
    moves step by step and a 20,000-step run writes a few dozen lines to a log file, not thousands.

    Args:
        updates: refreshes per bar (every ``ceil(total / updates)`` batches or steps, and at the end).
    """

    def __init__(self, updates: int = 50, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=1, process_position=process_position, leave=leave)
        self.updates = updates

    def _should_update(self, current: int, total: float | int | None) -> bool:
        known = total is not None and total != float("inf") and total > 0
        every = max(1, math.ceil(total / self.updates)) if known else self.updates
        return self.is_enabled and (current % every == 0 or current == total)

    @staticmethod
    def _step_based(trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if self._step_based(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step  # a resumed run continues where it stopped
            bar.set_description("train steps")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._step_based(trainer):  # step-based: one bar over all epochs
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._step_based(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
