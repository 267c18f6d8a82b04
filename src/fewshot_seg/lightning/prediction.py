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
        Image.fromarray(pred.cpu().numpy().astype("uint8") * 255).save(mask_path)
        image = query_image_at(batch, i, tuple(pred.shape))
        to_pil(overlay(image, pred, MAGENTA)).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
