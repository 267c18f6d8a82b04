"""Render a PNG grid of episodes of any DataModule (PIL only).

    python -m datamodules.visualize --datamodule SyntheticDataModule --root data/synthetic \
        --split train --num 4 --out episodes.png

One row per episode: the K supports with their masks overlaid (green; ignore = grey), then the
query with its mask, captioned with the class and image ids.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fewshot_seg.episode import IGNORE_INDEX, EpisodeBatch, collate_episodes

from .transforms import denormalize_image

_CAPTION = 14


def overlay(image: torch.Tensor, mask: torch.Tensor, color: Sequence[int] = (0, 255, 0)) -> np.ndarray:
    """Normalised ``[3, H, W]`` image + ``[H, W]`` {0, 1, 255} mask -> ``[H, W, 3]`` uint8 overlay."""
    rgb = denormalize_image(image).astype(np.float32)
    m = mask.cpu().numpy()
    fg, ign = m == 1, m == IGNORE_INDEX
    col = np.asarray(color, dtype=np.float32)
    rgb[fg] = 0.7 * rgb[fg] + 0.3 * col  # light tint keeps the object's own colour visible
    rgb[ign] = 0.5 * rgb[ign] + 0.5 * 128.0
    edge = np.zeros_like(fg)
    edge[1:] |= fg[1:] != fg[:-1]
    edge[:, 1:] |= fg[:, 1:] != fg[:, :-1]
    rgb[edge] = col
    return rgb.clip(0, 255).astype(np.uint8)


def render_batch(batch: EpisodeBatch, class_names: dict[int, str] | None = None) -> Image.Image:
    """A grid image of every episode of ``batch`` (rows) x (K supports + query) (columns)."""
    b, k = batch.batch_size, batch.shot
    h, w = batch.query_image.shape[-2:]
    cell_h = h + _CAPTION
    grid = Image.new("RGB", ((k + 1) * (w + 4), b * (cell_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        c = int(batch.class_id[i])
        name = (class_names or {}).get(c, str(c))
        y = i * (cell_h + 4)
        for j in range(k):
            tile = overlay(batch.support_images[i, j], batch.support_masks[i, j])
            grid.paste(Image.fromarray(tile), (j * (w + 4), y + _CAPTION))
            draw.text(
                (j * (w + 4) + 2, y + 1), f"S{j + 1} {batch.support_ids[i][j]}"[: w // 6], fill=(0, 0, 0)
            )
        tile = overlay(batch.query_image[i], batch.query_mask[i], color=(255, 0, 0))
        grid.paste(Image.fromarray(tile), (k * (w + 4), y + _CAPTION))
        draw.text((k * (w + 4) + 2, y + 1), f"Q c{c} {name}"[: w // 6], fill=(200, 0, 0))
    return grid


def render_episodes(datamodule, split: str = "train", num: int = 4) -> Image.Image:
    """Grid of the first ``num`` episodes of ``datamodule``'s ``split`` ("train", "val" or "test")."""
    dataset = datamodule.train_dataset() if split == "train" else datamodule.eval_dataset(split)
    samples = [dataset[i] for i in range(min(num, len(dataset)))]
    names = {i + 1: n for i, n in enumerate(getattr(datamodule, "class_names", ()))}
    return render_batch(collate_episodes(samples), names)


def main(argv: Sequence[str] | None = None) -> None:
    import datamodules

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datamodule", default="SyntheticDataModule", help="class name exported by datamodules")
    p.add_argument("--root", required=True, help="dataset root")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--num", type=int, default=4, help="episodes to draw")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="default: the DataModule's default")
    p.add_argument("--out", default="episodes.png")
    args = p.parse_args(argv)
    cls = getattr(datamodules, args.datamodule, None)
    if cls is None:
        raise SystemExit(f"unknown DataModule {args.datamodule!r}; choose from {datamodules.__all__}")
    kwargs = {"root": args.root, "fold": args.fold, "shot": args.shot, "num_workers": 0}
    if args.image_size:
        kwargs["image_size"] = args.image_size
    dm = cls(**kwargs)
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    if args.split == "train" and not hasattr(dm, "train_dataset"):
        raise SystemExit(f"{args.datamodule} has no training episodes")
    image = render_episodes(dm, args.split, args.num)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
