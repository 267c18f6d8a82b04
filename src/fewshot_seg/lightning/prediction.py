"""Writing ``predict`` outputs: one mask PNG (0/255) and one overlay PNG per query."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.visualize import MAGENTA, denormalize, overlay, to_pil


def query_image_at(batch: EpisodeBatch, i: int, size: tuple[int, int]) -> Tensor:
    """Query ``i`` as uint8 ``[3, h, w]`` at ``size``: its real content (no padding), resized bilinearly."""
    h, w = batch.query_valid_size[i].tolist()
    img = batch.query_image[i, :, :h, :w].float()
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return denormalize(img)


def output_stem(batch: EpisodeBatch, i: int, batch_idx: int) -> str:
    """File stem of query ``i``'s outputs: ``<query id>_c<class>`` (the id is the query file's name)."""
    query = Path(str(batch.query_id[i])).name if batch.query_id else f"query_{batch_idx}_{i}"
    return f"{query}_c{int(batch.class_id[i])}"


def write_predictions(
    batch: EpisodeBatch, preds: Sequence[Tensor], out_dir: Path, batch_idx: int = 0
) -> list[Path]:
    """Write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` (prediction tinted magenta) per query.

    Args:
        batch: the episodes whose queries were predicted.
        preds: B bool masks, each at the size it is written at (the query's original size).
        out_dir: created if needed.
        batch_idx: index of the batch, for queries without ids.

    Returns:
        The written paths, two per query.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, pred in enumerate(preds):
        stem = output_stem(batch, i, batch_idx)
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        Image.fromarray(pred.cpu().numpy().astype("uint8") * 255).save(mask_path)
        image = query_image_at(batch, i, tuple(pred.shape))
        to_pil(overlay(image, pred, MAGENTA)).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
