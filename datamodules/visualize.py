"""Render a PNG grid of episodes of any DataModule (``fewshot_seg.visualize.episode_grid``).

    python -m datamodules.visualize --datamodule SyntheticDataModule --root data/synthetic \
        --split train --num 4 --out episodes.png

One row per episode: the K supports with their masks overlaid (green; ignore = grey), then the
query with its mask, captioned with the class and image ids.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from fewshot_seg.episode import collate_episodes
from fewshot_seg.visualize import episode_grid


def render_episodes(datamodule, split: str = "train", num: int = 4) -> Image.Image:
    """Grid of the first ``num`` episodes of ``datamodule``'s ``split`` ("train", "val" or "test")."""
    dataset = datamodule.train_dataset() if split == "train" else datamodule.eval_dataset(split)
    samples = [dataset[i] for i in range(min(num, len(dataset)))]
    names = {i + 1: n for i, n in enumerate(getattr(datamodule, "class_names", ()))}
    return episode_grid(collate_episodes(samples), names)


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
