"""Memory of the COCO training loader: main process and each worker (USS / PSS / RSS), and the COCOSource.

    python benchmarks/data_memory.py --root /work/data/standin [--workers 2 4] [--batches 32]

``--root`` holds ``coco/`` (Coco20iDataModule, year 2014), e.g. the stand-in of
``benchmarks/make_standin.py`` at any ``--scale``. Each ``num_workers`` value runs in a FRESH process:
it builds ``dm.train_dataloader()`` (image_size 480, batch_size 4, fold 0, K = ``--shot``), iterates
``--batches`` batches, then, with the workers still alive, reads ``/proc/<pid>/smaps_rollup`` of itself
(main) and of each worker (its child processes): RSS, PSS (shared pages split among their users) and
USS (Private_Clean + Private_Dirty: what the process alone holds, freed when it exits).

The COCOSource's share: in another fresh process, RSS after ``dm.source("train")`` minus RSS before
(after the imports and the DataModule's constructor).
Class pools come from the class-count cache (``--cache-dir``, default the DataModule's), built once if
missing before the measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from _measure import (
    Timer,
    child_pids,
    cmdline,
    host_line,
    markdown_table,
    proc_status,
    quiet_warnings,
    rss_mb,
    run_json_child,
    smaps_rollup,
    standin_scale,
)

BATCH_SIZE = 4


def make_dm(root: str, workers: int, shot: int, cache_dir: str | None, length: int = 100_000):
    from datamodules import Coco20iDataModule

    return Coco20iDataModule(
        root=str(Path(root) / "coco"),
        year=2014,
        fold=0,
        shot=shot,
        image_size=480,
        batch_size=BATCH_SIZE,
        num_workers=workers,
        train_episodes=length,
        cache_dir=cache_dir,
    )


def source_share(root: str, cache_dir: str | None) -> dict:
    with quiet_warnings():
        dm = make_dm(root, 0, 1, cache_dir)
        gc.collect()
        before = rss_mb()
        with Timer() as t:
            src = dm.source("train")
        gc.collect()
        after = rss_mb()
    return {"before_mb": before, "after_mb": after, "seconds": t.seconds, "images": len(src.ids)}


def loader_memory(root: str, workers: int, shot: int, batches: int, cache_dir: str | None) -> dict:
    with quiet_warnings():
        dm = make_dm(root, workers, shot, cache_dir)
        loader = dm.train_dataloader()
        it = iter(loader)
        with Timer() as t:
            for _ in range(batches):
                next(it)
        kids = [p for p in child_pids() if "resource_tracker" not in cmdline(p)]
        out = {
            "main": smaps_rollup(),
            "main_hwm_mb": proc_status()["VmHWM"] / 1024,
            "workers": [smaps_rollup(p) for p in kids],
            "seconds": t.seconds,
        }
        del it, loader
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder with coco/ (make_standin.py --out)")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batches", type=int, default=32, help="batches iterated before reading memory")
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="class-count cache (default: the DataModule's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cache = str(Path(args.cache_dir) / "coco") if args.cache_dir else None
    if args.child == "source":
        print(json.dumps(source_share(args.root, cache)), flush=True)
        return
    if args.child is not None:
        run = loader_memory(args.root, int(args.child), args.shot, args.batches, cache)
        print(json.dumps(run), flush=True)
        return

    print(f"# data_memory: {' '.join(sys.argv[1:])}")
    print(f"host: {host_line()}")
    print(f"coco: stand-in scale {standin_scale(Path(args.root) / 'coco')}")
    with quiet_warnings(), Timer() as t:
        make_dm(args.root, 0, args.shot, cache).pools("train", [1])  # class counts: cached once
    print(f"class counts ready in {t.seconds:.1f} s (not measured below)", flush=True)
    base = [__file__, "--root", args.root, "--shot", str(args.shot), "--batches", str(args.batches)]
    base += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    src = run_json_child([*base, "--child", "source"])
    rows = []
    for w in args.workers:
        run = run_json_child([*base, "--child", str(w)])
        m = run["main"]
        rows.append((w, "main", *_cells(m)))
        for k, r in enumerate(run["workers"]):
            rows.append((w, f"worker {k}", *_cells(r)))
        ws = run["workers"]
        if len(ws) != w:
            print(f"warning: found {len(ws)} worker processes for num_workers={w}")
        if ws:
            mean = {k: sum(r[k] for r in ws) / len(ws) for k in ("dirty", "uss", "pss", "rss")}
            rows.append((w, "worker mean", *_cells(mean)))
        total = {k: m[k] + sum(r[k] for r in ws) for k in ("dirty", "uss", "pss")}
        rows.append((w, "all (main + workers)", *_cells(total, ("dirty", "uss", "pss")), ""))
        print(
            f"  num_workers={w}: {args.batches} batches in {run['seconds']:.1f} s, main peak RSS "
            f"{run['main_hwm_mb']:.0f} MB, PSS of main + workers {total['pss']:.0f} MB",
            flush=True,
        )
    print()
    headers = ["workers", "process", "private dirty MB", "USS MB", "PSS MB", "RSS MB"]
    print(markdown_table(headers, rows, [True, False, True, True, True, True]))
    print(
        f"\nCOCOSource (train, {src['images']:,} images): RSS {src['before_mb']:.0f} -> "
        f"{src['after_mb']:.0f} MB, share {src['after_mb'] - src['before_mb']:.0f} MB "
        f"(built in {src['seconds']:.1f} s, fresh process)."
    )
    print(
        f"Training loader: image_size 480, batch_size {BATCH_SIZE}, fold 0, K = {args.shot}; memory read "
        f"after {args.batches} batches with the workers alive. USS = Private_Clean + Private_Dirty (private "
        "dirty: written by the process itself; private clean: also file pages only it maps); PSS "
        "splits shared pages among the processes using them, so the PSS sum is the loader's real footprint."
    )


def _cells(mem: dict[str, float], keys: tuple[str, ...] = ("dirty", "uss", "pss", "rss")) -> tuple[str, ...]:
    return tuple(f"{mem[k]:.0f}" for k in keys)


if __name__ == "__main__":
    main()
