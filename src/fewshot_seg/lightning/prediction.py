"""Writing ``predict`` outputs: one mask PNG (0/255) and one overlay PNG per query."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.results import run_dir
from fewshot_seg.visualize import MAGENTA, denormalize, mask_image, overlay, to_pil

OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")


class OutputError(ValueError):
    """An output folder that cannot or must not be written (named in the message)."""


def check_output_folder(folder: Path, inputs: Path | None = None, overwrite: bool = True) -> None:
    """Refuse, before any work, an output folder that would lose or mix up files.

    Args:
        folder: where outputs go (created here if missing).
        inputs: a folder that is read as input: outputs inside it would be read back on the next run.
        overwrite: allow replacing outputs (``*_mask.png`` / ``*_overlay.png``) already in ``folder``.

    Raises:
        OutputError: the folder is inside ``inputs``, holds earlier outputs (unless ``overwrite``), or
            cannot be created or written.
    """
    if inputs is not None and folder.resolve().is_relative_to(inputs.resolve()):
        raise OutputError(
            f"output folder {folder} is inside the input folder {inputs}: a later run would read its "
            "outputs as inputs; choose a folder outside it"
        )
    if not overwrite and folder.is_dir():
        earlier = [p for p in folder.rglob("*") if p.name.endswith(OUTPUT_SUFFIXES)]
        if earlier:
            raise OutputError(
                f"output folder {folder} already holds {len(earlier)} output file(s) of an earlier run "
                f"(e.g. {earlier[0]}): choose another folder, or allow replacing them "
                "(predict: --model.init_args.overwrite_predictions=true)"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to output folder {folder}: {err.strerror or err}") from err


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
        self._taken: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.folder = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        inputs = getattr(trainer.datamodule, "query_dir", None) if trainer.datamodule is not None else None
        check_output_folder(self.folder, inputs, self.overwrite)
        self._taken = set()

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
        write_predictions(batch, prediction, self.folder, batch_idx, self._taken)


def query_image_at(batch: EpisodeBatch, i: int, size: tuple[int, int]) -> Tensor:
    """Query ``i`` as uint8 ``[3, h, w]`` at ``size``: its real content (no padding), resized bilinearly."""
    h, w = batch.query_valid_size[i].tolist()
    img = batch.query_image[i, :, :h, :w].float()
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return denormalize(img)


def output_stem(batch: EpisodeBatch, i: int, batch_idx: int) -> str:
    """Relative stem of query ``i``'s outputs: ``<query id>_c<class>``.

    A folder query's id is its path under ``queries/`` with the extension (``sub/a.jpg``), so ``a.jpg``
    and ``a.png`` never share outputs; sub-folders are kept.
    """
    query = str(batch.query_id[i]) if batch.query_id else f"query_{batch_idx}_{i}"
    return f"{query}_c{int(batch.class_id[i])}"


def write_predictions(
    batch: EpisodeBatch,
    preds: Sequence[Tensor],
    out_dir: Path,
    batch_idx: int = 0,
    taken: set[str] | None = None,
) -> list[Path]:
    """Write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` (prediction tinted magenta) per query.

    Args:
        batch: the episodes whose queries were predicted.
        preds: B bool masks, each at the size it is written at (the query's original size).
        out_dir: created if needed.
        batch_idx: index of the batch, for queries without ids.
        taken: stems this run already wrote; a repeated (query, class) episode gets ``-2``, ``-3``, ...

    Returns:
        The written paths, two per query.
    """
    written = []
    for i, pred in enumerate(preds):
        stem = output_stem(batch, i, batch_idx)
        if taken is not None:
            base, n = stem, 2
            while stem in taken:
                stem, n = f"{base}-{n}", n + 1
            taken.add(stem)
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        mask_image(pred).save(mask_path)
        image = query_image_at(batch, i, tuple(pred.shape))
        to_pil(overlay(image, pred, MAGENTA)).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
