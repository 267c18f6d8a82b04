"""First-use cost of the data layer: class-count scans and test/val episode lists, cold and warm.

    python benchmarks/data_scan.py --root /work/data/standin [--only voc|coco] [--fold 0] [--shot 1]

``--root`` holds ``voc/`` (Pascal5iDataModule) and ``coco/`` (Coco20iDataModule, year 2014), e.g. the
stand-in of ``benchmarks/make_standin.py`` at any ``--scale``. Steps, per dataset:

- ``train class counts``: ``dm.pools("train", dm.base_classes)`` (scans every training label);
- ``test class counts``: ``dm.pools("test", dm.novel_classes)`` (scans every test label);
- ``test+val episode lists``: ``dm.episode_list("test")`` then ``dm.episode_list("val")``; with an
  empty cache this includes the test class-count scan, as on a first ``fit`` / ``test``.

Each step runs in a FRESH process with an EMPTY cache dir (a temporary folder, ``cache_dir=``), so its
peak RSS (VmHWM) belongs to that step ("cold"); then again in another fresh process with the cache that
the cold run left ("warm", cache hit). Times run from constructing the DataModule to the step's result,
so they include building the source (listing the VOC folders, parsing the COCO JSON); peak RSS includes
the interpreter and its imports (torch, Lightning), whose size is printed below the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _measure import (
    Timer,
    host_line,
    markdown_table,
    peak_rss_mb,
    quiet_warnings,
    rss_mb,
    run_json_child,
    standin_scale,
)

STEPS = ("train class counts", "test class counts", "test+val episode lists")


def make_dm(dataset: str, root: str, cache_dir: str, fold: int, shot: int):
    from datamodules import Coco20iDataModule, Pascal5iDataModule

    common = {"fold": fold, "shot": shot, "cache_dir": cache_dir, "num_workers": 0}
    if dataset == "voc":
        return Pascal5iDataModule(root=str(Path(root) / "voc"), **common)
    return Coco20iDataModule(root=str(Path(root) / "coco"), year=2014, **common)


def child(dataset: str, step: str, root: str, cache_dir: str, fold: int, shot: int) -> dict:
    """One step in this (fresh) process; returns its time, memory and a size figure."""
    import datamodules  # noqa: F401  (imports are not part of the step)

    base_rss, base_peak = rss_mb(), peak_rss_mb()
    with quiet_warnings(), Timer() as t:
        dm = make_dm(dataset, root, cache_dir, fold, shot)
        if step == "train class counts":
            pools = dm.pools("train", dm.base_classes)
            size = len(dm.source("train").ids)
        elif step == "test class counts":
            pools = dm.pools("test", dm.novel_classes)
            size = len(dm.source("test").ids)
        else:
            lists = [dm.episode_list("test"), dm.episode_list("val")]
            size = len(dm.source("test").ids)
            pools = None
    out = {"seconds": t.seconds, "peak_mb": peak_rss_mb(), "base_mb": base_rss, "base_peak_mb": base_peak}
    out["images"] = size
    out["pool_images"] = len({i for ids in pools.values() for i in ids}) if pools else None
    out["episodes"] = [len(x) for x in lists] if pools is None else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with voc/ and coco/ (make_standin.py --out)")
    p.add_argument("--only", choices=["voc", "coco"], default=None)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--tmp", default=None, help="where the temporary cache dirs go (default: system temp)")
    p.add_argument("--child", nargs=3, metavar=("DATASET", "STEP", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        dataset, step, cache_dir = args.child
        print(json.dumps(child(dataset, step, args.root, cache_dir, args.fold, args.shot)), flush=True)
        return

    datasets = [args.only] if args.only else ["voc", "coco"]
    print(f"# data_scan: {' '.join(sys.argv[1:])}")
    print(f"host: {host_line()}")
    for d in datasets:
        print(f"{d}: stand-in scale {standin_scale(Path(args.root) / d)}")
    rows, bases = [], []
    names = {"voc": "VOC (Pascal5i)", "coco": "COCO 2014 (Coco20i)"}
    for d in datasets:
        for step in STEPS:
            cache = tempfile.mkdtemp(prefix=f"data_scan_{d}_", dir=args.tmp)
            try:
                run = [__file__, "--root", args.root, "--fold", str(args.fold), "--shot", str(args.shot)]
                cold = run_json_child([*run, "--child", d, step, cache])
                warm = run_json_child([*run, "--child", d, step, cache])
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            bases += [cold["base_mb"], warm["base_mb"]]
            size = f"{cold['images']:,}"
            if cold["episodes"]:
                size += f" ({' + '.join(f'{n:,}' for n in cold['episodes'])} episodes)"
            rows.append(
                (
                    names[d],
                    step,
                    size,
                    f"{cold['seconds']:.1f}",
                    _peak(cold),
                    f"{warm['seconds']:.2f}",
                    _peak(warm),
                )
            )
            print(
                f"  {names[d]} / {step}: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.2f} s",
                flush=True,
            )
    print()
    print(
        markdown_table(
            [
                "dataset",
                "step",
                "images",
                "cold time s",
                "cold peak RSS MB",
                "warm time s",
                "warm peak RSS MB",
            ],
            rows,
            [False, False, True, True, True, True, True],
        )
    )
    print(
        f"\nPeak RSS includes the process's RSS after its imports, before the step ({min(bases):.0f}-"
        f"{max(bases):.0f} MB); (+N) is the peak minus that. Fold {args.fold}, shot {args.shot}; test and "
        "val lists of 1,000 episodes each (max_shot 5)."
    )


def _peak(run: dict) -> str:
    return f"{run['peak_mb']:.0f} (+{run['peak_mb'] - run['base_mb']:.0f})"


if __name__ == "__main__":
    main()
