"""What both stage modules share: backbone + POS, freezing, optimiser, the evaluation loop and its metrics."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from fewshot_seg.checkpoints import STAGE_KEY, CheckpointError
from fewshot_seg.config import BackboneConfig, OptimizerConfig, POSConfig, as_dict
from fewshot_seg.contracts import data_class_ids
from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.evaluation import to_label_size
from fewshot_seg.lightning.callbacks import FreezeModules
from fewshot_seg.lightning.finite import StepCheck, check_outputs
from fewshot_seg.lightning.optim import build_optimizer, resolve_max_steps
from fewshot_seg.lightning.prediction import PredictionWriter
from fewshot_seg.lightning.provenance import (
    PROVENANCE_KEY,
    check_class_split,
    code_version,
    data_record,
    merge_trained_on,
    trained_on,
)
from fewshot_seg.lightning.results import report_results, summarize
from fewshot_seg.metrics import FewShotIoU, unscored_note
from fewshot_seg.models.backbone import backbone_lr_mult, build_backbone
from fewshot_seg.models.build import build_pos
from fewshot_seg.models.freezing import freeze
from fewshot_seg.visualize import prediction_row

SPLITS = ("val", "test")
"""The evaluated splits, each with its own metrics (``EpisodeModule.metrics``)."""


class EpisodeModule(pl.LightningModule):
    """Backbone + POS construction, optimiser, evaluation metrics and test-end results.

    Subclasses build their networks in ``__init__``, define :meth:`training_step` and :meth:`evaluate`
    (foreground maps ``[B, H, W]`` at the model input size, keyed by what they are: ``"model"``,
    ``"oracle"``, ``"baseline"``; the first of :attr:`metric_names` is what ``predict`` writes).

    Args:
        optim: optimiser, schedule and global batch.
        eval_class_ids: class ids to score; None = the DataModule's ``novel_classes``.
        predict_dir: where ``predict`` writes masks and overlays; None = ``<run dir>/predictions``.
        allow_class_overlap: use the model on data whose novel classes it may have trained on
            (another dataset, another fold), e.g. COCO-trained, Pascal-tested transfer; the overlap
            is reported in results.json. Off by default: such a run is refused (``lightning.provenance``).
    """

    stage: str = ""
    metric_names: tuple[str, ...] = ()
    monitor_metric: str = ""
    trains_with_supports: bool = True
    """whether ``training_step`` reads the episodes' supports (``fewshot_seg.contracts.SupportsModel``)."""
    architecture_hparams: tuple[str, ...] = ("backbone", "pos")
    """Hyper-parameters that fix the weights' shapes: taken from a checkpoint given with ``--ckpt_path``."""

    def __init__(
        self,
        optim: OptimizerConfig,
        eval_class_ids: list[int] | None = None,
        predict_dir: str | None = None,
        allow_class_overlap: bool = False,
        overwrite_predictions: bool = False,
    ) -> None:
        super().__init__()
        self.optim = optim
        self.allow_class_overlap = allow_class_overlap
        self.run_config: dict | None = None  # the CLI's resolved config, recorded in checkpoints
        self._provenance: dict | None = None  # what trained the weights this module holds
        self._overlap: dict | None = None
        self.eval_class_ids = [int(c) for c in eval_class_ids] if eval_class_ids else None
        self.predict_dir = predict_dir
        self.overwrite_predictions = overwrite_predictions
        self.frozen_modules: tuple[str, ...] = ()
        self.backbone_config: BackboneConfig | None = None
        """set by a stage whose backbone may train (its ``lr_mult`` then applies)."""
        self.metrics = nn.ModuleDict({split: nn.ModuleDict() for split in SPLITS})
        """``metrics[split][name]``: one FewShotIoU per metric name, created by :meth:`setup`."""
        self.weights_from: str | None = None
        """where this module's trained weights came from (a checkpoint), None while untrained."""
        self.test_results: dict | None = None
        """the last test's summary (results.json)."""
        self._test_started = 0.0
        self.step_check: StepCheck | None = None
        """the current training step's non-finite checks (set by ``training_step``)."""

    def _hparams_as_dicts(self) -> None:
        """Store the saved configuration objects as plain dicts: checkpoints then load with
        ``weights_only=True`` and without this package's classes."""
        self.hparams.update({k: as_dict(v) for k, v in self.hparams.items()})

    def _build_backbone_and_pos(
        self, backbone: BackboneConfig, pos: POSConfig, weights: str | None, frozen_bn: bool
    ) -> None:
        self.backbone = build_backbone(
            backbone.name, weights=weights, frozen_bn=frozen_bn, pyramid_channels=backbone.pyramid_channels
        )
        self.pos = build_pos(pos, self.backbone.out_channels)

    # ------------------------------------------------------------------ freezing
    def _freeze_now(self) -> None:
        # Frozen at construction too (not only by the callback) so that an optimiser built
        # outside a Trainer never sees these parameters.
        for name in self.frozen_modules:
            freeze(self.get_submodule(name))

    def configure_callbacks(self) -> list[pl.Callback]:
        # The module brings its own freezing callback: forgetting it in a config must not
        # silently train the backbone or drift its BatchNorm statistics.
        # ``predict`` writes its outputs through a callback (Lightning's place for it): masks and overlays.
        callbacks: list[pl.Callback] = [PredictionWriter(self.predict_dir, self.overwrite_predictions)]
        if self.frozen_modules:
            callbacks.insert(0, FreezeModules(self.frozen_modules))
        return callbacks

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise the uint8 images of an episode batch, once, on the model's device (``EpisodeBatch``)."""
        return batch.normalized() if isinstance(batch, EpisodeBatch) else batch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The non-finite check that waits for the gradient scaler's decision (``16-mixed``; finite.py)."""
        if self.step_check is not None:
            self.step_check.after_optimizer_step()

    def backbone_features(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone features; under ``no_grad`` when the backbone is frozen (SPEC §2)."""
        if "backbone" in self.frozen_modules:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict:
        return build_optimizer(
            self,
            self.optim,
            max_steps=resolve_max_steps(self.optim.max_steps, self._trainer),
            lr_mult=backbone_lr_mult(self.backbone, self.backbone_config.lr_mult)
            if self.backbone_config is not None
            else None,
        )

    # ------------------------------------------------------------------ provenance
    def _prior_training(self) -> dict | None:
        """What the weights had seen before this fit (a resumed run's, or stage 2's stage-1 model)."""
        return trained_on(self._provenance)

    def _data(self) -> dict | None:
        return data_record(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)

    def _check_data(self, what: str, trained: dict | None) -> None:
        self._overlap = check_class_split(trained, self._data(), what, self.allow_class_overlap)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage
        data = self._data()
        checkpoint[PROVENANCE_KEY] = {
            "stage": self.stage,
            "data": data,
            "trained_on": merge_trained_on(self._prior_training(), data),
            **self._extra_provenance(),
            **code_version(),
            "config": self.run_config,
        }

    def _extra_provenance(self) -> dict[str, Any]:
        return {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.weights_from = "checkpoint"
        self._provenance = checkpoint.get(PROVENANCE_KEY)

    def on_fit_start(self) -> None:
        # A resumed fit must continue on the data it started on.
        self._check_data("fit", self._prior_training())

    def _require_trained_weights(self, command: str) -> None:
        """Refuse to evaluate a model built without trained weights (a forgotten ``--ckpt_path``)."""
        if self.weights_from is None:
            raise CheckpointError(
                f"`{command}` needs trained {type(self).__name__} weights: pass --ckpt_path=<checkpoint of "
                f"a {type(self).__name__} fit> (this model was built without any)"
            )

    # ------------------------------------------------------------------ metrics
    def _class_ids(self) -> list[int] | None:
        return self.eval_class_ids or data_class_ids(self._trainer)

    @property
    def global_batch_size(self) -> int:
        """Episodes per optimisation step over all processes (``optim.batch_size``): what a DataModule
        without its own ``batch_size`` splits over processes (``fewshot_seg.contracts``)."""
        return self.optim.batch_size

    def setup(self, stage: str) -> None:
        """Create the metrics once the DataModule (hence the class ids) is known; kept across epochs."""
        ids = self._class_ids()
        if ids is None:
            if stage != "predict":
                raise CheckpointError(
                    "evaluation needs the novel class ids: use a DataModule with `novel_classes` or set "
                    "the model's eval_class_ids"
                )
            return
        for split in SPLITS:
            current = next(iter(self.metrics[split].values()), None)
            if current is None or current.class_ids != ids:
                self.metrics[split] = nn.ModuleDict({n: FewShotIoU(ids) for n in self.metric_names})

    def _reset(self, split: str) -> None:
        for metric in self.metrics[split].values():
            metric.reset()

    def evaluate(self, batch: EpisodeBatch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_step(self, batch: EpisodeBatch, split: str, batch_idx: int) -> None:
        maps = self.evaluate(batch)
        if split == "val" and self._trainer is not None and self.trainer.state.fn == "fit":
            # A fit's validation of diverged weights: stop before a checkpoint of them is written.
            check_outputs(self, maps, "in validation")
        metrics = self.metrics[split]
        for name, fg in maps.items():
            preds = to_label_size(fg, batch.query_valid_size, batch.original_sizes)
            metrics[name].update(preds, batch.query_label_orig, batch.class_id)
        if split == "val" and batch_idx == 0:
            self._log_pictures(batch, maps, split)

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")
        self._test_started = time.perf_counter()

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _compute(self, split: str) -> dict[str, dict]:
        """Every metric of ``split`` over all processes, logged as ``<split>/[name_]miou|fbiou``."""
        results = {name: m.compute() for name, m in self.metrics[split].items()}
        flat = {}
        for name, res in results.items():
            prefix = "" if name == "model" else f"{name}_"
            flat[f"{split}/{prefix}miou"] = res["miou"].float()
            flat[f"{split}/{prefix}fbiou"] = res["fbiou"].float()
        note = unscored_note(next(iter(results.values())), split) if results else None
        if note and split == "val" and not self.trainer.sanity_checking:
            # val/miou chooses the best checkpoint: say that it is over fewer classes (the test's table
            # says it for the test). Python shows one warning text once, so not at every validation.
            rank_zero_warn(note)
        # Reduced across processes by torchmetrics already: every rank holds the same values, whose
        # mean (sync_dist) is that value; asking for it keeps Lightning from warning under DDP.
        self.log_dict(flat, prog_bar=True, sync_dist=True)
        return results

    def on_validation_epoch_end(self) -> None:
        self._compute("val")

    def on_test_epoch_end(self) -> None:
        results = self._compute("test")
        dm = getattr(self.trainer, "datamodule", None)
        summary = summarize(
            results,
            stage=self.stage,
            datamodule=dm,
            wall_time_s=time.perf_counter() - self._test_started,
        )
        summary["provenance"] = {
            "model": {k: v for k, v in (self._provenance or {}).items() if k != "config"},
            "data": self._data(),
            "class_overlap": self._overlap,
            "allow_class_overlap": self.allow_class_overlap,
            "test_run": {**code_version(), "config": self.run_config},
        }
        self.test_results = summary
        report_results(summary, self.trainer)

    # ------------------------------------------------------------------ pictures
    def _log_pictures(self, batch: EpisodeBatch, maps: dict[str, Tensor], split: str, n: int = 4) -> None:
        """A few episodes (query with GT, then each prediction) as one picture to W&B (only)."""
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or self.trainer.sanity_checking:
            return
        rows = [prediction_row(batch, maps, i) for i in range(min(n, batch.batch_size))]
        picture = torch.cat(rows, dim=1).permute(1, 2, 0).cpu().numpy()  # same size rows: one image
        caption = (
            "GT | " + " | ".join(maps) + "; classes " + ", ".join(str(int(c)) for c in batch.class_id[:n])
        )
        for lg in loggers:
            lg.log_image(key=f"{split}/episodes", images=[picture], caption=[caption], step=self.global_step)

    # ------------------------------------------------------------------ prediction
    def on_predict_start(self) -> None:
        self._require_trained_weights("predict")
        self._check_data("predict", trained_on(self._provenance))

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":  # during a fit the weights are being trained
            self._require_trained_weights("validate")
            self._check_data("validate", trained_on(self._provenance))

    def on_test_start(self) -> None:
        self._require_trained_weights("test")
        self._check_data("test", trained_on(self._provenance))

    def predict_foreground(self, batch: EpisodeBatch) -> Tensor:
        """``[B, H, W]`` the map ``predict`` thresholds: the first of :attr:`metric_names`."""
        return self.evaluate(batch)[self.metric_names[0]]

    def predict_step(self, batch: EpisodeBatch, batch_idx: int) -> list[Tensor]:
        """B bool masks at each query's original size (or the protocol's scoring size), for
        :class:`~fewshot_seg.lightning.prediction.PredictionWriter` to write."""
        fg = self.predict_foreground(batch)
        sizes = (
            batch.original_sizes
            if batch.query_label_orig
            else [(int(h), int(w)) for h, w in batch.query_valid_size.tolist()]
        )
        return to_label_size(fg, batch.query_valid_size, sizes)
