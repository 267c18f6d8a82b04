"""Shared parts of the two LightningModules: backbone + POS, evaluation protocol, results, pictures."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.episode import PIXEL_MEAN, PIXEL_STD, EpisodeBatch
from fewshot_seg.lightning.callbacks import FreezeModules
from fewshot_seg.lightning.optim import build_optimizer, resolve_max_steps
from fewshot_seg.lightning.results import format_class_table, run_dir, write_results
from fewshot_seg.metrics import FewShotIoU
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.pos import PotentialObjectsSegmenter

log = logging.getLogger(__name__)

STAGE_KEY = "fewshot_seg_stage"
"""Checkpoint entry naming the stage that wrote it ("pos" or "mm"), checked when stage 2 loads stage 1."""


def to_original_size(
    foreground: Tensor, valid_size: Tensor, orig_sizes: Sequence[tuple[int, int]], threshold: float = 0.5
) -> list[Tensor]:
    """Evaluation protocol (SPEC §5/§6): crop, resize to the original label, threshold.

    Each map is cropped to the query's real content (``valid_size``, top-left aligned) *before* the
    resize, so padding never leaks in; it is then resized bilinearly to the original label size
    (align_corners=True, as the PFENet/HSNet evaluators) and thresholded (foreground where > 0.5).

    Args:
        foreground: ``[B, H, W]`` foreground map at the model input size.
        valid_size: ``[B, 2]`` (h, w) of real content.
        orig_sizes: B original label sizes.

    Returns:
        B bool tensors ``[h_i, w_i]``.
    """
    preds = []
    for fg, (h, w), size in zip(foreground.float(), valid_size.tolist(), orig_sizes):
        crop = fg[:h, :w]
        if tuple(crop.shape) != tuple(size):
            crop = F.interpolate(crop[None, None], size=tuple(size), mode="bilinear", align_corners=True)[
                0, 0
            ]
        preds.append(crop > threshold)
    return preds


def denormalise(image: Tensor) -> Tensor:
    """``[3, H, W]`` normalised RGB -> uint8 ``[3, H, W]``."""
    mean = torch.tensor(PIXEL_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=image.device).view(3, 1, 1)
    return (image.float() * std + mean).clamp(0, 255).round().to(torch.uint8)


def overlay(
    image: Tensor, mask: Tensor, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5
) -> Tensor:
    """Blend ``color`` over ``image`` (uint8 ``[3, H, W]``) where ``mask`` (``[H, W]`` bool) is set."""
    out = image.float().clone()
    tint = torch.tensor(color, dtype=out.dtype, device=out.device).view(3, 1, 1)
    m = mask.to(out.device)[None].expand_as(out)
    out[m] = ((1 - alpha) * out + alpha * tint)[m]
    return out.round().to(torch.uint8)


def query_image_at_original(batch: EpisodeBatch, i: int) -> Tensor:
    """Query ``i`` as uint8 ``[3, h, w]`` at its original label size (valid crop, bilinear)."""
    h, w = batch.query_valid_size[i].tolist()
    img = batch.query_image[i, :, :h, :w].float()
    size = batch.original_sizes[i] if batch.query_label_orig else (h, w)
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return denormalise(img)


class EpisodeModule(pl.LightningModule):
    """Backbone + POS construction, optimiser, evaluation metrics and test-end results.

    Subclasses define :meth:`training_step` and :meth:`evaluate` (which returns foreground maps at
    the model input size, keyed by what they are: ``"model"``, ``"oracle"``, ``"baseline"``).
    """

    stage: str = ""
    frozen_modules: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    monitor_metric: str = ""

    def _build_backbone_and_pos(
        self,
        backbone: str,
        backbone_weights: str | None,
        frozen_bn: bool,
        num_queries: int,
        pos_dim: int,
        pos_heads: int,
        enc_layers: int,
        enc_ffn: int,
        dec_layers: int,
        dec_ffn: int,
        norm_groups: int,
    ) -> None:
        self.backbone = build_backbone(backbone, weights=backbone_weights, frozen_bn=frozen_bn)
        self.pos = PotentialObjectsSegmenter(
            in_channels=dict(self.backbone.out_channels),
            conv_dim=pos_dim,
            mask_dim=pos_dim,
            hidden_dim=pos_dim,
            num_queries=num_queries,
            enc_layers=enc_layers,
            enc_heads=pos_heads,
            enc_ffn=enc_ffn,
            dec_layers=dec_layers,
            dec_heads=pos_heads,
            dec_ffn=dec_ffn,
            norm_groups=norm_groups,
        )

    # ------------------------------------------------------------------ freezing
    def _freeze_now(self) -> None:
        # Frozen at construction too (not only by the callback) so that an optimiser built
        # outside a Trainer never sees these parameters.
        for name in self.frozen_modules:
            self.get_submodule(name).requires_grad_(False).eval()

    def configure_callbacks(self) -> list[pl.Callback]:
        # The module brings its own freezing callback: forgetting it in a config must not
        # silently train the backbone or drift its BatchNorm statistics.
        return [FreezeModules(self.frozen_modules)] if self.frozen_modules else []

    def backbone_features(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone features; under ``no_grad`` when the backbone is frozen (SPEC §2)."""
        if "backbone" in self.frozen_modules:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return build_optimizer(
            self,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            max_steps=resolve_max_steps(hp.max_steps, self._trainer),
            poly_power=hp.poly_power,
            lr_mult={"backbone": hp.get("backbone_lr_mult", 1.0)},
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STAGE_KEY] = self.stage

    # ------------------------------------------------------------------ evaluation
    def _class_ids(self) -> list[int]:
        override = self.hparams.get("eval_class_ids")
        if override:
            return [int(c) for c in override]
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        ids = getattr(dm, "novel_classes", None)
        if not ids:
            raise RuntimeError(
                "evaluation needs the novel class ids: use a DataModule with `novel_classes` "
                "or set the model's eval_class_ids"
            )
        return [int(c) for c in ids]

    def _make_metrics(self, split: str) -> None:
        ids = self._class_ids()
        metrics = nn.ModuleDict({name: FewShotIoU(ids) for name in self.metric_names}).to(self.device)
        setattr(self, f"{split}_metrics", metrics)

    def _metrics(self, split: str) -> nn.ModuleDict:
        return getattr(self, f"{split}_metrics")

    def on_validation_epoch_start(self) -> None:
        self._make_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._make_metrics("test")
        self._test_start = time.perf_counter()

    def evaluate(self, batch: EpisodeBatch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_step(self, batch: EpisodeBatch, split: str, batch_idx: int) -> dict[str, list[Tensor]]:
        maps = self.evaluate(batch)
        targets = batch.query_label_orig
        preds: dict[str, list[Tensor]] = {}
        for name, fg in maps.items():
            preds[name] = to_original_size(fg, batch.query_valid_size, batch.original_sizes)
            self._metrics(split)[name].update(preds[name], targets, batch.class_id)
        if split == "val" and batch_idx == 0:
            self._log_pictures(batch, preds, split)
        return preds

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _log_split_metrics(self, split: str) -> dict[str, dict]:
        results = {name: m.compute() for name, m in self._metrics(split).items()}
        flat = {}
        for name, res in results.items():
            prefix = "" if name == "model" else f"{name}_"
            flat[f"{split}/{prefix}miou"] = res["miou"].float()
            flat[f"{split}/{prefix}fbiou"] = res["fbiou"].float()
        # Values are already reduced across processes by torchmetrics.
        self.log_dict(flat, prog_bar=True, sync_dist=False)
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_split_metrics("val")

    def on_test_epoch_end(self) -> None:
        results = self._log_split_metrics("test")
        wall = time.perf_counter() - getattr(self, "_test_start", time.perf_counter())
        main = results[self.metric_names[0]]
        metric = self._metrics("test")[self.metric_names[0]]
        dm = getattr(self.trainer, "datamodule", None)
        names = {c: dm.class_name(c) for c in metric.class_ids} if hasattr(dm, "class_name") else {}
        # compute() syncs the states only while computing and then restores this process's own
        # counts; the episode counts are read in a sync of their own so that under DDP they cover
        # every process's shard, not rank 0's alone (a no-op in a single process).
        with metric.sync_context():
            class_episodes = metric.class_episodes()
        summary = {
            "stage": self.stage,
            "dataset": getattr(dm, "name", type(dm).__name__) if dm is not None else None,
            "fold": getattr(dm, "fold", None),
            "shot": getattr(dm, "shot", None),
            "miou": float(main["miou"]),
            "fbiou": float(main["fbiou"]),
            "oracle_miou": float(results["oracle"]["miou"]) if "oracle" in results else None,
            "oracle_fbiou": float(results["oracle"]["fbiou"]) if "oracle" in results else None,
            "baseline_miou": float(results["baseline"]["miou"]) if "baseline" in results else None,
            "baseline_fbiou": float(results["baseline"]["fbiou"]) if "baseline" in results else None,
            "class_iou": {str(c): float(v) for c, v in main["class_iou"].items()},
            "class_episodes": {str(c): n for c, n in class_episodes.items()},
            "class_names": {str(c): n for c, n in names.items()},
            "wall_time_s": wall,
        }
        if "model" in results and "oracle" in results:
            summary["oracle_class_iou"] = {
                str(c): float(v) for c, v in results["oracle"]["class_iou"].items()
            }
        if "baseline" in results:
            summary["baseline_class_iou"] = {
                str(c): float(v) for c, v in results["baseline"]["class_iou"].items()
            }
        self.test_results = summary
        if self.trainer.is_global_zero:
            print(format_class_table(summary))
            folder = run_dir(self.trainer)
            write_results(summary, folder)
            print(f"results written to {folder / 'results.json'}")

    # ------------------------------------------------------------------ pictures
    def _log_pictures(
        self, batch: EpisodeBatch, preds: dict[str, list[Tensor]], split: str, n: int = 4
    ) -> None:
        """A few episodes (query with GT and each prediction) to W&B; nothing for other loggers."""
        try:
            from pytorch_lightning.loggers import WandbLogger
        except ImportError:  # pragma: no cover - wandb extra missing
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or self.trainer.sanity_checking:
            return
        images, captions = [], []
        for i in range(min(n, batch.batch_size)):
            img = query_image_at_original(batch, i)
            gt = batch.query_label_orig[i] == 1
            row = [overlay(img, gt.to(img.device), (0, 255, 0))]
            row += [overlay(img, preds[k][i].to(img.device)) for k in preds]
            images.append(torch.cat(row, dim=2).permute(1, 2, 0).cpu().numpy())
            captions.append(f"class {int(batch.class_id[i])}: GT | " + " | ".join(preds))
        for lg in loggers:
            lg.log_image(key=f"{split}/episodes", images=images, caption=captions, step=self.global_step)

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: EpisodeBatch, batch_idx: int) -> list[str]:
        """Write ``<query_id>_mask.png`` (0/255) and ``<query_id>_overlay.png`` per query; returns paths."""
        from PIL import Image

        out_dir = Path(self.hparams.get("predict_dir") or Path(run_dir(self.trainer)) / "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        fg = self.evaluate(batch)[self.metric_names[0]]
        sizes = (
            batch.original_sizes
            if batch.query_label_orig
            else [tuple(s) for s in batch.query_valid_size.tolist()]
        )
        preds = to_original_size(fg, batch.query_valid_size, sizes)
        written = []
        for i, pred in enumerate(preds):
            stem = Path(str(batch.query_id[i]) if batch.query_id else f"query_{batch_idx}_{i}").name
            stem = f"{stem}_c{int(batch.class_id[i])}"
            mask_path, ov_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
            Image.fromarray(pred.cpu().numpy().astype("uint8") * 255).save(mask_path)
            img = overlay(query_image_at_original(batch, i), pred)
            Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(ov_path)
            written += [str(mask_path), str(ov_path)]
        return written
