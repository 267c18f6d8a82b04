"""Pictures of episodes and predictions: de-normalisation, mask overlays, grids (torchvision utils).

One module for every picture the project draws: the episode grids of ``python -m datamodules.visualize``,
the validation episodes logged to W&B and the overlays ``predict`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from fewshot_seg.episode import IGNORE_INDEX, PIXEL_MEAN, PIXEL_STD, EpisodeBatch
from fewshot_seg.label_maps import class_colors

Color = tuple[int, int, int]
GREEN: Color = (0, 255, 0)
RED: Color = (255, 0, 0)
MAGENTA: Color = (255, 0, 255)
GREY: Color = (128, 128, 128)
CAPTION_HEIGHT = 14


def denormalize(image: Tensor) -> Tensor:
    """``[3, H, W]`` RGB normalised with ``PIXEL_MEAN`` / ``PIXEL_STD`` -> uint8 ``[3, H, W]`` (a uint8
    image, as loaders deliver them, is returned as it is)."""
    if image.dtype == torch.uint8:
        return image
    mean = torch.tensor(PIXEL_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=image.device).view(3, 1, 1)
    return (image.detach().float() * std + mean).clamp(0, 255).round().to(torch.uint8)


def overlay(
    image: Tensor, mask: Tensor, color: Color = RED, alpha: float = 0.5, outline: bool = False
) -> Tensor:
    """Tint ``image`` (uint8 ``[3, H, W]``) with ``color`` where ``mask`` is 1 (or True); grey where 255.

    Args:
        image: uint8 ``[3, H, W]``.
        mask: ``[H, W]`` bool, or integer in {0, 1, 255} (255 = ignore, drawn grey).
        color: RGB of the tint.
        alpha: opacity of the tint.
        outline: also draw the mask's edge in full ``color`` (the object's own colours stay visible).

    Returns:
        uint8 ``[3, H, W]``.
    """
    mask = mask.to(image.device)
    fg = mask.bool() if mask.dtype == torch.bool else mask == 1
    out = draw_segmentation_masks(image.cpu(), fg.cpu(), alpha=alpha, colors=color)
    if mask.dtype != torch.bool and bool((mask == IGNORE_INDEX).any()):
        out = draw_segmentation_masks(out, (mask == IGNORE_INDEX).cpu(), alpha=0.5, colors=GREY)
    if outline:
        edge = torch.zeros_like(fg)
        edge[1:] |= fg[1:] != fg[:-1]
        edge[:, 1:] |= fg[:, 1:] != fg[:, :-1]
        out = draw_segmentation_masks(out, edge.cpu(), alpha=1.0, colors=color)
    return out


def to_pil(image: Tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` -> PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def mask_image(mask: Tensor | np.ndarray) -> Image.Image:
    """A predicted ``[H, W]`` mask (bool or {0, 1}) as the 0/255 greyscale image every output file is."""
    values = mask.cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    return Image.fromarray((values != 0).astype(np.uint8) * np.uint8(255))


def prediction_overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """``[H, W, 3]`` uint8 RGB with a predicted ``[H, W]`` mask tinted magenta (the overlay outputs)."""
    return to_pil(
        overlay(torch.tensor(image).permute(2, 0, 1), torch.from_numpy(np.asarray(mask) != 0), MAGENTA)
    )


def captioned_grid(tiles: Sequence[Tensor], captions: Sequence[str], ncol: int, pad: int = 4) -> Image.Image:
    """Equal-size uint8 ``[3, H, W]`` tiles in rows of ``ncol`` (``make_grid``), each captioned above."""
    h, w = tiles[0].shape[-2:]
    strip = torch.full((3, CAPTION_HEIGHT, w), 255, dtype=torch.uint8)
    framed = [torch.cat([strip, t.cpu()], dim=1) for t in tiles]
    grid = to_pil(make_grid(framed, nrow=ncol, padding=pad, pad_value=255))
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(captions):
        r, c = divmod(i, ncol)
        x, y = pad + c * (w + pad), pad + r * (h + CAPTION_HEIGHT + pad)
        draw.text((x + 2, y + 1), text[: max(4, w // 6)], fill=(0, 0, 0))
    return grid


def episode_grid(batch: EpisodeBatch, class_names: Mapping[int, str] | None = None) -> Image.Image:
    """One row per episode of ``batch``: the K supports (mask in green, ignore grey), then the query (red)."""
    tiles, captions = [], []
    for i in range(batch.batch_size):
        c = int(batch.class_id[i])
        for j in range(batch.shot):
            img = denormalize(batch.support_images[i, j])
            tiles.append(overlay(img, batch.support_masks[i, j], GREEN, alpha=0.3, outline=True))
            captions.append(f"S{j + 1} {batch.support_ids[i][j]}" if batch.support_ids else f"S{j + 1}")
        img = denormalize(batch.query_image[i])
        tiles.append(overlay(img, batch.query_mask[i], RED, alpha=0.3, outline=True))
        captions.append(f"Q c{c} {(class_names or {}).get(c, '')}".rstrip())
    return captioned_grid(tiles, captions, ncol=batch.shot + 1)


def prediction_row(batch: EpisodeBatch, maps: Mapping[str, Tensor], i: int, threshold: float = 0.5) -> Tensor:
    """Query ``i`` at the model input size: ground truth (green), then each map (red), side by side.

    Args:
        batch: the episodes.
        maps: name -> ``[B, H, W]`` foreground maps at the model input size.
        i: the episode.
        threshold: foreground where a map exceeds it.

    Returns:
        uint8 ``[3, H, (1 + len(maps)) * W]``.
    """
    img = denormalize(batch.query_image[i])
    row = [overlay(img, batch.query_mask[i], GREEN)]
    row += [overlay(img, fg[i] > threshold, RED) for fg in maps.values()]
    return torch.cat(row, dim=2)


def class_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``[H, W, 3]`` uint8 RGB with each class of an ``[H, W]`` label map tinted in its palette colour.

    The colours are those of the label PNGs (``label_maps.class_colors``: class 1 dark red, 2 green, ...),
    so an overlay and its label map read alike; background (0) and ignore (255) stay untinted.
    """
    values = np.asarray(labels)
    present = [int(v) for v in np.unique(values) if v not in (0, IGNORE_INDEX)]
    out = torch.tensor(image).permute(2, 0, 1)
    if present:
        masks = torch.from_numpy(np.stack([values == v for v in present]))
        colors = class_colors()
        out = draw_segmentation_masks(out, masks, alpha=alpha, colors=[colors[v] for v in present])
    return to_pil(out)
