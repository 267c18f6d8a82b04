"""Writing ``predict`` outputs: one mask PNG (0/255) and one overlay PNG per query."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.results import run_dir
from fewshot_seg.outputs import MASK_SUFFIX, OVERLAY_SUFFIX, OutputNames, check_output_folder, save_png_atomic
from fewshot_seg.visualize import MAGENTA, denormalize, mask_image, overlay, to_pil


class PredictionWriter(BasePredictionWriter):
    """Writes each ``predict`` batch's masks and overlays (:func:`write_predictions`) as it comes.

    The folder is checked when ``predict`` starts, before any query is read (:func:`check_output_folder`):
    never inside the DataModule's ``query_dir``, never over an earlier run's outputs unless
    ``overwrite``, and writable.

    Args:
        output_dir: the folder; None = ``<run dir>/predictions``.
        overwrite: replace outputs an earlier run left there.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.folder: Path | None = None
        self._names = OutputNames()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.folder = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        inputs = getattr(trainer.datamodule, "query_dir", None) if trainer.datamodule is not None else None
        check_output_folder(self.folder, inputs, self.overwrite)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loader exists now: a folder DataModule names its queries, so that "a.jpg" and "a.png" keep
        # their extensions (fewshot_seg.outputs); a DataModule without query ids gives query_<batch>_<i>.
        self._names = OutputNames(getattr(trainer.datamodule, "query_ids", None) or ())

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.folder is not None, "setup('predict') sets the folder"
        write_predictions(batch, prediction, self.folder, batch_idx, self._names)


def query_image_at(batch: EpisodeBatch, i: int, size: tuple[int, int]) -> Tensor:
    """Query ``i`` as uint8 ``[3, h, w]`` at ``size``: its real content (no padding), resized bilinearly."""
    h, w = batch.query_valid_size[i].tolist()
    img = batch.query_image[i, :, :h, :w].float()
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return denormalize(img)


def query_name(batch: EpisodeBatch, i: int, batch_idx: int) -> str:
    """Query ``i``'s name: its id (a folder query: its path under ``queries/`` with the extension,
    ``sub/a.jpg``), else ``query_<batch>_<i>``."""
    return str(batch.query_id[i]) if batch.query_id else f"query_{batch_idx}_{i}"


def write_predictions(
    batch: EpisodeBatch,
    preds: Sequence[Tensor],
    out_dir: Path,
    batch_idx: int = 0,
    names: OutputNames | None = None,
) -> list[Path]:
    """Write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` (prediction tinted magenta) per query,
    each atomically; the stem is the query's name and class, ``sub/a_c1`` (``fewshot_seg.outputs``).

    Args:
        batch: the episodes whose queries were predicted.
        preds: B bool masks, each at the size it is written at (the query's original size).
        out_dir: created if needed.
        batch_idx: index of the batch, for queries without ids.
        names: this run's names (a repeated (query, class) episode gets ``-2``, ``-3``, ...); None = a
            new one for this batch alone.

    Returns:
        The written paths, two per query.
    """
    names = names if names is not None else OutputNames()
    written = []
    for i, pred in enumerate(preds):
        stem = names.stem(query_name(batch, i, batch_idx), f"_c{int(batch.class_id[i])}")
        mask_path, overlay_path = out_dir / f"{stem}{MASK_SUFFIX}", out_dir / f"{stem}{OVERLAY_SUFFIX}"
        save_png_atomic(mask_image(pred), mask_path)
        image = query_image_at(batch, i, tuple(pred.shape))
        save_png_atomic(to_pil(overlay(image, pred, MAGENTA)), overlay_path)
        written += [mask_path, overlay_path]
    return written
