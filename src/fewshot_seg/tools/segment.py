"""``fewshot-seg segment``: label a folder of images from a few annotated examples.

    fewshot-seg segment --ckpt stage2.ckpt --support a.jpg a_mask.png [--support b.jpg b_mask.png ...] \\
        --queries DIR_OR_FILES... --out OUT [--batch-size N] [--device auto] [--overlay] [--overwrite]

Writes ``OUT/<query path relative to its folder, without extension>_mask.png`` (0/255, at the query's
displayed size; sub-folders kept; two queries that would share a name keep their extension:
``a.jpg_mask.png``, ``a.png_mask.png``), ``..._overlay.png`` with ``--overlay``, and
``OUT/manifest.csv`` (query, mask, foreground fraction, status). A second run skips the queries
whose mask exists (``--overwrite`` redoes them); masks are written atomically, so an interrupted run
never leaves a half-written mask that a later run would skip. A query that cannot be read is reported
by name, every other one is written, and the exit status is then 1; a bad checkpoint or support stops
with one line and exit status 2. ``OUT`` belongs to one run (``segment_run``: the run record
``segment_run.json`` refuses another checkpoint, other supports, size or precision without
``--overwrite``; the lock ``.segment.lock``; ``--overlay`` draws the overlays finished masks lack).

with one line and exit status 2.

With named classes (``--class NAME IMAGE MASK``, ``--supports DIR``, ``--class-names`` / ``--classes-file``)
the run is the class flow of ``tools/segment_classes.py``: palette label PNGs, a fraction column per
class, COCO ``annotations.json``, and ``--devices N`` for several processes (docs/inference.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot_seg.errors import DatasetError
from fewshot_seg.outputs import MASK_SUFFIX, OVERLAY_SUFFIX, OutputNames, check_output_folder, save_png_atomic
from fewshot_seg.segmenter import Segmenter, Supports
from fewshot_seg.tools.common import USER_ERRORS, ToolError, load_segmenter, model_tool_parser
from fewshot_seg.tools.segment_options import add_class_options, check_class_options, uses_classes
from fewshot_seg.tools.segment_run import (
    SINGLE_CLASS,
    check_queries_not_out,
    check_run_record,
    check_support_order,
    draw_missing_overlays,
    finished_fraction,
    lock_output,
    report_mask_rules,
    run_record,
    support_file_hashes,
)
from fewshot_seg.user_images import read_user_image, scan_images
from fewshot_seg.visualize import mask_image, prediction_overlay

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("query", "mask", "foreground_fraction", "status")


@dataclass
class Query:
    """One query file and where its outputs go."""

    path: Path
    stem: str  # output stem relative to OUT: "sub/a" (or "sub/a.jpg" when "sub/a" is taken twice)
    mask: Path
    status: str = ""
    fraction: float | None = None
    rel: str = ""  # the query's path relative to its --queries folder (its COCO file_name)

    @property
    def overlay(self) -> Path:
        return self.mask.with_name(self.mask.name.removesuffix(MASK_SUFFIX) + OVERLAY_SUFFIX)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_tool_parser(
        "fewshot-seg segment",
        "Segment every query image from K annotated supports with a stage-2 checkpoint.",
    )
    parser.add_argument(
        "--support",
        nargs=2,
        action="append",
        metavar=("IMAGE", "MASK"),
        help="a support image and its mask; repeat for K shots (a class-index mask with --class-names)",
    )
    parser.add_argument("--queries", nargs="+", required=True, help="query image files and/or folders")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--batch-size", type=int, help="queries per forward pass (default: 8 on a GPU, 1 on a CPU)"
    )
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo queries whose mask exists; also into a folder another run (checkpoint, supports, "
        "size, precision) made",
    )
    add_class_options(parser)
    return parser.parse_args(argv)


def collect_queries(sources: list[str], out: Path) -> tuple[list[Query], list[str]]:
    """The query images of ``sources`` (files, or folders searched recursively) and the files skipped.

    Folders are scanned by ``scan_images`` (no mask ``*_mask.*``, no hidden file, nothing under ``out``);
    outputs are named by ``OutputNames`` (``fewshot_seg.outputs``).
    """
    found: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            images, unsupported = scan_images(path, recursive=True, exclude=out)
            found += [(f, f.relative_to(path).as_posix()) for f in images]
            skipped += [str(f) for f in unsupported]
        elif path.is_file() or not path.exists():  # a missing file is reported as a failed query
            found.append((path, path.name))
    names = OutputNames(rel for _, rel in found)
    queries = []
    for f, rel in found:
        stem = names.stem(rel)
        queries.append(Query(f, stem, out / f"{stem}{MASK_SUFFIX}", rel=rel))
    return queries, skipped


def _write_outputs(query: Query, image: np.ndarray, mask: np.ndarray, with_overlay: bool) -> None:
    save_png_atomic(mask_image(mask), query.mask)
    if with_overlay:
        save_png_atomic(prediction_overlay(image, mask), query.overlay)
    query.fraction = float(mask.mean())
    query.status = "written"


def segment_folder(
    segmenter: Segmenter,
    supports: Supports,
    queries: list[Query],
    batch_size: int | None = None,
    with_overlay: bool = False,
    overwrite: bool = False,
) -> None:
    """Segment ``queries`` in batches, setting each one's ``status`` (written / exists / failed: why)."""
    todo = []
    for q in queries:
        fraction = None if overwrite else finished_fraction(q.mask)  # an unreadable mask is redone
        if fraction is not None:
            q.status, q.fraction = "exists", fraction
        else:
            todo.append(q)
    batch_size = batch_size or segmenter.default_batch_size
    with tqdm(total=len(todo), desc="segment", unit="image", file=sys.stderr, disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = []
            for q in todo[start : start + batch_size]:
                try:
                    batch.append((q, read_user_image(q.path, "query")))
                except DatasetError as err:
                    q.status = f"failed: {err}"
                    bar.update(1)
            if batch:
                masks = segmenter.segment_arrays([img for _, img in batch], supports)
                for (q, img), mask in zip(batch, masks):
                    _write_outputs(q, img, mask, with_overlay)
                bar.update(len(batch))


def write_manifest(queries: list[Query], out: Path) -> Path:
    path = out / MANIFEST
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for q in queries:
            fraction = "" if q.fraction is None else f"{q.fraction:.6f}"
            mask = q.mask.relative_to(out).as_posix() if q.status in ("written", "exists") else ""
            writer.writerow([str(q.path), mask, fraction, q.status or "not run"])
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.batch_size is not None and args.batch_size < 1:
        raise ToolError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_class_options(args)
    check_output_folder(out)
    check_queries_not_out(args.queries, out)
    check_support_order(args.support or [])
    queries, skipped = collect_queries(args.queries, out)
    if not queries:
        raise DatasetError(f"no query image found in {' '.join(args.queries)}")
    if uses_classes(args) and args.devices is not None:
        # Every process of a --devices run starts here (Lightning re-runs the command per rank): one lock
        # would refuse the others, so a multi-process run takes neither the lock nor the run record.
        from fewshot_seg.tools.segment_classes import run_classes

        return run_classes(args, out, queries, skipped)
    lock = lock_output(out)
    if uses_classes(args):  # the class flow imports this module's Query and reporting: imported here
        from fewshot_seg.tools.segment_classes import run_classes

        try:
            return run_classes(args, out, queries, skipped)
        finally:
            lock.release()
    try:
        segmenter = load_segmenter(args)
        images, masks = zip(*args.support)
        print("\n".join(report_mask_rules(masks)))
        supports = segmenter.encode_supports(list(images), list(masks))
        record = run_record(
            args.ckpt, support_file_hashes({SINGLE_CLASS: args.support}), segmenter.image_size, args.precision
        )
        check_run_record(out, record, args.overwrite)
        try:
            segment_folder(segmenter, supports, queries, args.batch_size, args.overlay, args.overwrite)
            if args.overlay:
                draw_missing_overlays(queries)
        finally:
            manifest = write_manifest(queries, out)
    finally:
        lock.release()
    counts = Counter(q.status.split(":")[0] for q in queries)
    print(
        f"{counts['written']} mask(s) written, {counts['exists']} already there (--overwrite redoes them), "
        f"{counts['failed']} failed; manifest: {manifest}"
    )
    failed = [
        (str(q.path), q.status.removeprefix("failed: ")) for q in queries if q.status.startswith("failed")
    ]
    report_problems(skipped, failed)
    return 1 if failed else 0


def report_problems(skipped: list[str], failed: list[tuple[str, str]]) -> None:
    """The files skipped (stdout) and each failed query with its reason (stderr), after the summary."""
    if skipped:
        print(f"{len(skipped)} file(s) skipped, not an image format PIL reads: {', '.join(skipped)}")
    for path, why in failed:
        print(f"  {path}: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all written, 1 some query failed (the others written), 2 a user error (one line)."""
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
