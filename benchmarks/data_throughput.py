"""Episodes per second of each training loader at 480 x 480, K = 1 / 5, num_workers = 0 / 2.

Pascal-5i and COCO-20i read tiny fake datasets written in their real on-disk formats (VOC-sized
500 x 375 JPEGs / 640 x 480 COCO JPEGs); the synthetic set is generated at a reduced count.

    python benchmarks/data_throughput.py [--episodes 48] [--workdir /tmp/fewshot_bench]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from datamodules import Coco20iDataModule, Pascal5iDataModule, SyntheticDataModule
from datamodules.fake import make_fake_coco, make_fake_voc


def episodes_per_second(dm, episodes: int) -> float:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up and first batch are not throughput
    n, t = 0, time.perf_counter()
    for batch in it:
        n += batch.batch_size
        if n >= episodes:
            break
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=48, help="timed episodes per configuration")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fewshot_bench_"))
    voc = work / "voc"
    if not voc.exists():
        make_fake_voc(voc, per_class=8, size=(375, 500))
    coco = work / "coco"
    if not coco.exists():
        make_fake_coco(coco, per_class=8, size=(480, 640))
    makers = {
        "Pascal5i": lambda **kw: Pascal5iDataModule(root=str(voc), **kw),
        "Coco20i": lambda **kw: Coco20iDataModule(root=str(coco), **kw),
        "Synthetic": lambda **kw: SyntheticDataModule(
            root=str(work / "syn"), num_train=400, num_val=300, **kw
        ),
    }
    print(f"{'dataset':<10} {'shot':>4} {'workers':>7} {'episodes/s':>10}")
    for name, make in makers.items():
        for shot in (1, 5):
            for workers in (0, 2):
                dm = make(shot=shot, image_size=480, batch_size=4, num_workers=workers, train_episodes=10_000)
                dm.prepare_data()
                rate = episodes_per_second(dm, args.episodes)
                print(f"{name:<10} {shot:>4} {workers:>7} {rate:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
