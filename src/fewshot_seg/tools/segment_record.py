"""The run folder of ``fewshot-seg segment`` with classes: per-process record files, resume, final merge.

Every process (one, or each DDP rank) appends one JSON line per finished query to its own file
``OUT/.segment-parts/rank<r>.jsonl``, right after the query's label PNG is written: an append is cheap,
so a million queries cost no rewrite of a growing JSON file, and a kill leaves at most one torn last
line, which is ignored. One process (rank 0) then folds the lines into ``OUT/annotations.json``
(``fewshot_seg.coco_export``: unique ids, a query done again replaces its earlier record) and rewrites
``OUT/manifest.csv`` for every query; it does so at the start of a run too, so the lines of a killed
run are kept (resume), and the record files are removed once folded in.

A line::

    {"query": "photos/a.jpg", "file_name": "a.jpg", "rank": 0, "status": "written",
     "fractions": [0.12, 0.0], "width": 50, "height": 40, "annotations": [{...}, ...]}

(``annotations`` is null without ``--format coco``; a failed query has ``"status": "failed: <why>"``.)
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_seg.atomic import write_atomic
from fewshot_seg.multiclass import read_index_mask
from fewshot_seg.outputs import OutputError
from fewshot_seg.tools.segment import MANIFEST

PARTS_FOLDER = ".segment-parts"


def part_path(out: Path, rank: int) -> Path:
    """The record file of process ``rank``."""
    return out / PARTS_FOLDER / f"rank{rank}.jsonl"


def _ends_without_newline(path: Path) -> bool:
    """Whether ``path`` exists and its last byte is not a newline (read alone: the file may be large)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class PartWriter:
    """Appends one JSON line per query to ``OUT/.segment-parts/rank<r>.jsonl`` (flushed per line)."""

    def __init__(self, out: Path, rank: int = 0) -> None:
        self.path = part_path(out, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        torn = _ends_without_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the whole run)
        if torn:  # a killed run's last line: end it, so that it stays one ignored line
            self._file.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({**record, "rank": self.rank}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_parts(out: Path) -> list[dict[str, Any]]:
    """Every record line of every process, rank 0 first, in writing order; torn lines skipped."""
    folder = out / PARTS_FOLDER
    if not folder.is_dir():
        return []

    def rank(p: Path) -> int:
        digits = p.stem.removeprefix("rank")
        return int(digits) if digits.isdigit() else 1 << 30

    records = []
    for path in sorted(folder.glob("rank*.jsonl"), key=rank):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the torn last line of a killed process
                continue
    return records


def clear_parts(out: Path) -> None:
    """Remove the record files once folded into ``annotations.json`` and ``manifest.csv``."""
    folder = out / PARTS_FOLDER
    if folder.is_dir():
        for path in folder.glob("rank*.jsonl"):
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def fold_annotations(out: Path, names: Sequence[str], records: Sequence[dict[str, Any]]) -> Any:
    """``OUT/annotations.json`` completed with the written records (a file name done again replaces it).

    Returns the :class:`~fewshot_seg.coco_export.CocoAnnotations`, written atomically.
    """
    # pycocotools only when COCO output is asked for: the 1-class path imports no data stack
    # (tests/test_inference_imports.py).
    from fewshot_seg.coco_export import ANNOTATIONS_FILE, CocoAnnotations

    coco = CocoAnnotations.load_or_new(out / ANNOTATIONS_FILE, names)
    for rec in records:
        if rec.get("status") == "written" and rec.get("annotations") is not None:
            coco.add_annotations(rec["file_name"], rec["width"], rec["height"], rec["annotations"])
    coco.write(out / ANNOTATIONS_FILE)
    return coco


def check_annotations(out: Path, names: Sequence[str]) -> None:
    """Refuse, before any work, an ``annotations.json`` in ``out`` that cannot be completed by this run.

    Raises:
        OutputError: one line naming the file: unreadable, or made for other classes (both lists named).
    """
    from fewshot_seg.coco_export import ANNOTATIONS_FILE, AnnotationsError, CocoAnnotations

    try:
        CocoAnnotations.load_or_new(out / ANNOTATIONS_FILE, names)
    except AnnotationsError as err:
        raise OutputError(str(err)) from err


def annotated_names(out: Path, names: Sequence[str]) -> set[str]:
    """The file names ``OUT/annotations.json`` holds (empty when there is none)."""
    from fewshot_seg.coco_export import ANNOTATIONS_FILE, CocoAnnotations

    return set(CocoAnnotations.load_or_new(out / ANNOTATIONS_FILE, names).file_names)


@dataclass
class RunSummary:
    """What a finished run did, for its last lines and its exit status."""

    counts: Counter = field(default_factory=Counter)
    per_rank: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)


def class_fractions(mask_path: Path, n_classes: int) -> list[float]:
    """The fraction of an existing label PNG each class 1..N covers (a query an earlier run finished)."""
    values = read_index_mask(mask_path, "label map")
    counts = np.bincount(values.ravel(), minlength=256)[1 : n_classes + 1]
    return (counts / max(values.size, 1)).tolist()


def manifest_fields(names: Sequence[str]) -> list[str]:
    """``query, mask, foreground_fraction, fraction_<class>..., status``."""
    return ["query", "mask", "foreground_fraction", *(f"fraction_{n}" for n in names), "status"]


def write_class_manifest(
    out: Path, queries: Sequence[Any], names: Sequence[str], records: Sequence[dict[str, Any]]
) -> RunSummary:
    """``OUT/manifest.csv``: a row per query (this run's record, else ``exists`` or ``not run``).

    Args:
        queries: the run's ``tools.segment.Query`` objects (``path``, ``mask``), in order.
        records: this run's record lines (:func:`read_parts`).
    """
    summary = RunSummary()
    by_query: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec["query"] in by_query:
            summary.repeated.append(rec["query"])
        by_query[rec["query"]] = rec
        summary.per_rank[int(rec.get("rank", 0))] += rec["status"] == "written"
    rows = []
    for q in queries:
        rec = by_query.get(str(q.path))
        mask = q.mask.relative_to(out).as_posix()
        if rec is not None:
            status, fractions = rec["status"], rec.get("fractions")
        elif q.mask.is_file():
            status, fractions = "exists", class_fractions(q.mask, len(names))
        else:
            status, fractions = "not run", None
        summary.counts[status.split(":")[0]] += 1
        if status.startswith("failed"):
            summary.failed.append((str(q.path), status.removeprefix("failed: ")))
        cells = [f"{v:.6f}" for v in [sum(fractions), *fractions]] if fractions else [""] * (len(names) + 1)
        rows.append([str(q.path), mask if fractions else "", *cells, status])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(manifest_fields(names))
            writer.writerows(rows)

    write_atomic(out / MANIFEST, write)
    return summary


def pending(
    queries: Sequence[Any], out: Path, names: Sequence[str], coco: bool, overwrite: bool
) -> list[Any]:
    """The queries to segment: all with ``overwrite``; else those without a label PNG, or (COCO) without
    a record in ``annotations.json`` (a kill between the PNG and the record: done again, with its score)."""
    if overwrite:
        return list(queries)
    annotated = annotated_names(out, names) if coco else set()
    return [q for q in queries if not q.mask.is_file() or (coco and q.rel not in annotated)]


def fold_leftovers(out: Path, names: Sequence[str], coco: bool) -> None:
    """A killed run's record lines folded into ``annotations.json`` (resume), then removed."""
    records = read_parts(out)
    if records and coco:
        fold_annotations(out, names, records)
    if records:
        clear_parts(out)


def finish(out: Path, queries: Sequence[Any], names: Sequence[str], coco: bool) -> RunSummary:
    """Fold this run's record lines into ``annotations.json`` and ``manifest.csv`` (one process)."""
    records = read_parts(out)
    if coco:
        fold_annotations(out, names, records)
    summary = write_class_manifest(out, queries, names, records)
    clear_parts(out)
    return summary


__all__ = [
    "PARTS_FOLDER",
    "PartWriter",
    "RunSummary",
    "check_annotations",
    "finish",
    "fold_leftovers",
    "manifest_fields",
    "pending",
    "read_parts",
    "write_class_manifest",
]
