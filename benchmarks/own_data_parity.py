"""The same data through another door: the synthetic set as a COCO-format export must give the same numbers.

    python benchmarks/own_data_parity.py                       # the demo size: two ~18-minute CPU runs
    python benchmarks/own_data_parity.py --max-steps 60 --test-episodes 200   # a reduced run
    python benchmarks/own_data_parity.py --only coco_format   # one door (run both at once, then compare)

Exports the synthetic set (fold 0 of ``make train-fold``) to COCO instance JSONs
(``datamodules.export.voc_to_coco_format``: one RLE per class of an image, the 255 boundary band as a crowd
region painted 255, category ids 3 + 7c), then runs ``train_fold`` twice with the demo stage files: on
``SyntheticDataModule`` and on ``CocoFormatDataModule`` with the synthetic fold's novel classes by name.
Prints model / oracle / baseline mIoU of both and their difference, and exits 1 when a difference
exceeds ``--tolerance`` (1 mIoU). The episodes are the same pixel for pixel
(``tests/test_data_own.py``), so on one machine the numbers should be too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules import SYNTHETIC_CLASSES, SyntheticDataModule, generate_synthetic_voc
from datamodules.export import voc_to_coco_format
from fewshot_seg import config_dir
from fewshot_seg.tools.train_fold import main as train_fold

DEMO_STAGES = ["stage1_pos_cpu_demo.yaml", "stage2_mm_cpu_demo.yaml"]
DOORS = ("synthetic", "coco_format")
ROWS = (("model", "miou"), ("oracle", "oracle_miou"), ("heuristic baseline", "baseline_miou"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--export", type=Path, default=Path("data/synthetic_coco"), help="where the JSONs go")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/own_data_parity"))
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="both stages (default: the demo files')")
    parser.add_argument("--test-episodes", type=int, default=None, help="default: the data YAML's (1,000)")
    parser.add_argument("--val-episodes", type=int, default=None, help="default: the data YAML's (200)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest allowed mIoU difference")
    parser.add_argument(
        "--only",
        choices=DOORS,
        default=None,
        help="train this door only (two processes can train both at once; a run with both then compares)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generate_synthetic_voc(args.synthetic_root)  # the data_synthetic.yaml defaults; a no-op when present
    if args.only == "synthetic":  # the export is the other door's
        paths = {split: args.export / "annotations" / f"{split}.json" for split in ("train", "test")}
    else:
        paths = voc_to_coco_format(args.synthetic_root, args.export, SYNTHETIC_CLASSES)
    fold_classes = SyntheticDataModule(root=str(args.synthetic_root)).fold_novel_classes(args.fold)
    novel = [SYNTHETIC_CLASSES[c - 1] for c in fold_classes]
    common = ["--fold", str(args.fold), "--stage-configs", *DEMO_STAGES, "--no-gpu"]
    extra = [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    extra += [f"--data.init_args.test_episodes={args.test_episodes}"] if args.test_episodes else []
    extra += [f"--data.init_args.val_episodes={args.val_episodes}"] if args.val_episodes else []
    synthetic = ["--dataset", "synthetic", "--data-root", str(args.synthetic_root)]
    # The synthetic YAML's sizes, so that only the door differs.
    coco_data = [
        f"--data.init_args.annotations={paths['train'].resolve()}",
        f"--data.init_args.test_annotations={paths['test'].resolve()}",
        f"--data.init_args.images={(args.synthetic_root / 'JPEGImages').resolve()}",
        f"--data.init_args.novel_classes={json.dumps(novel)}",
        "--data.init_args.crowd=ignore",
        "--data.init_args.image_size=128",
        "--data.init_args.num_workers=2",
        "--data.init_args.val_episodes=200",
        "--data.init_args.pool_min_pixels=200",
    ]
    coco = ["--data-config", str(config_dir() / "data_coco_format.yaml"), "--data-root", str(args.export)]
    summaries = {}
    for door, door_args, door_extra in zip(DOORS, (synthetic, coco), ([], coco_data), strict=True):
        if args.only not in (None, door):
            continue
        run_dir = args.run_dir / door
        out = train_fold([*door_args, *common, "--run-dir", str(run_dir), "--", *door_extra, *extra])
        summaries[door] = json.loads(Path(out).read_text())
    if args.only:
        return 0
    episodes = sum(summaries["synthetic"]["class_episodes"].values())
    print(f"\nsynthetic fold {args.fold}, 1-shot, {episodes} test episodes, through two DataModules")
    print("| mIoU | SyntheticDataModule | CocoFormatDataModule | difference |\n|---|---:|---:|---:|")
    worst = 0.0
    for label, key in ROWS:
        a, b = summaries["synthetic"][key], summaries["coco_format"][key]
        worst = max(worst, abs(a - b))
        print(f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    ok = worst <= args.tolerance
    print(f"largest difference {worst:.2f} mIoU: {'within' if ok else 'OVER'} the tolerance {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
