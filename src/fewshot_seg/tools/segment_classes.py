"""``fewshot-seg segment`` with several classes: a palette label PNG, a manifest row, COCO annotations.

    fewshot-seg segment --ckpt stage2.ckpt --class scratch s1.jpg s1_mask.png --class dent d.jpg d_mask.png \\
        --queries photos/ --out labels/ [--overlay] [--format coco|png] [--instances] [--devices N]

Supports: ``--class NAME IMAGE MASK`` (binary mask; repeat), ``--supports DIR``
(``multiclass.examples_from_folder``), or ``--support IMAGE MASK`` with class-index masks and
``--class-names`` / ``--classes-file``. Per query
``OUT/<stem>_mask.png``: a palette PNG of the label map (0 background, i = the i-th class; usable again as
a class-index support mask), ``--overlay`` in the same colours; ``OUT/manifest.csv`` with a fraction
column per class; and with ``--format coco`` (the default here) ``OUT/annotations.json``. Each process
appends its queries to a record file that is folded into the manifest and the JSON at the end
(``tools/segment_record.py``); ``--devices`` runs the queries through Lightning's predict loop
(``tools/segment_ddp.py``). Neither Lightning nor pycocotools is imported unless asked for.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fewshot_seg.atomic import write_atomic
from fewshot_seg.errors import DatasetError
from fewshot_seg.label_maps import write_label_png
from fewshot_seg.multiclass import (
    ClassExamples,
    ClassSegmentation,
    EncodedClasses,
    check_at_model_size,
    collect_examples,
    examples_from_folder,
)
from fewshot_seg.segmenter import Segmenter
from fewshot_seg.tools.common import load_segmenter
from fewshot_seg.tools.segment import MANIFEST, Query, report_problems
from fewshot_seg.tools.segment_record import (
    PartWriter,
    RunSummary,
    check_annotations,
    finish,
    fold_leftovers,
    pending,
)
from fewshot_seg.tools.segment_run import check_run_record, run_record, support_array_hashes
from fewshot_seg.user_images import read_user_image
from fewshot_seg.visualize import class_overlay

Item = tuple[Query, np.ndarray | None, ClassSegmentation | None, str | None]
"""One query of a batch: (query, image, result, None) or (query, None, None, why it failed)."""


def read_examples(args: argparse.Namespace) -> ClassExamples:
    """The supports of every class the options give, read and checked (no model needed).

    Raises:
        DatasetError: one line naming the class or file (``multiclass.collect_examples``).
    """
    if args.supports_dir:
        return examples_from_folder(args.supports_dir)
    named = [tuple(c) for c in args.classes or []]
    indexed = [tuple(s) for s in args.support or []]
    return collect_examples(named, indexed, args.classes_file or args.class_names)


def segment_batch(segmenter: Segmenter, classes: EncodedClasses, queries: Sequence[Query]) -> list[Item]:
    """Read and label one batch of queries; backbone and POS once for all classes (``segment_class_arrays``).

    Returns one :data:`Item` per query: a query that cannot be read carries its reason instead of a result.
    """
    items: list[Item] = []
    read = []
    for q in queries:
        try:
            read.append((q, read_user_image(q.path, "query")))
        except DatasetError as err:  # named and reported; the other queries go on
            items.append((q, None, None, str(err)))
    if read:
        results = segmenter.segment_class_arrays([img for _, img in read], classes)
        items += [(q, img, res, None) for (q, img), res in zip(read, results)]
    return items


@dataclass
class ClassOutputs:
    """Writes one process's outputs: label PNG, overlay, and the query's record line (``PartWriter``)."""

    names: Sequence[str]
    part: PartWriter
    overlay: bool = False
    coco: bool = True
    instances: bool = False

    def write_batch(self, items: Sequence[Item]) -> None:
        for q, image, result, error in items:
            if result is None or image is None:
                self.part.append({"query": str(q.path), "file_name": q.rel, "status": f"failed: {error}"})
            else:
                self.write(q, image, result)

    def write(self, q: Query, image: np.ndarray, result: ClassSegmentation) -> None:
        """The label PNG (and overlay) first, the record line last: a record means its files exist."""
        write_label_png(q.mask, result.labels)
        if self.overlay:
            picture = class_overlay(image, result.labels)
            write_atomic(q.overlay, lambda tmp: picture.save(tmp, format="PNG"))
        h, w = result.labels.shape
        self.part.append(
            {
                "query": str(q.path),
                "file_name": q.rel,
                "status": "written",
                "fractions": result.fractions(len(self.names)),
                "width": w,
                "height": h,
                "annotations": self._annotations(result),
            }
        )

    def _annotations(self, result: ClassSegmentation) -> list[dict[str, Any]] | None:
        if not self.coco:
            return None
        from fewshot_seg.coco_export import label_annotations  # pycocotools only when asked for

        return label_annotations(result.labels, len(self.names), result.confidence, self.instances)


def run_one_process(
    args: argparse.Namespace, out: Path, queries: list[Query], examples: ClassExamples, coco: bool
) -> RunSummary:
    """The class flow in this process: supports encoded once, queries in batches, the records folded at the
    end (also when interrupted: what was written stays done)."""
    segmenter = load_segmenter(args)
    check_at_model_size(examples, segmenter.image_size)
    record = run_record(args.ckpt, support_array_hashes(examples), segmenter.image_size, args.precision)
    check_run_record(out, record, args.overwrite)  # the folder's masks all come from one run
    classes = segmenter.encode_classes(examples)
    fold_leftovers(out, classes.names, coco)  # a killed run's queries stay done
    todo = pending(queries, out, classes.names, coco, args.overwrite)
    outputs = ClassOutputs(classes.names, PartWriter(out), args.overlay, coco, args.instances)
    batch_size = args.batch_size or segmenter.default_batch_size
    try:
        with tqdm(total=len(todo), desc="segment", unit="image", file=sys.stderr, disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                outputs.write_batch(segment_batch(segmenter, classes, chunk))
                bar.update(len(chunk))
    finally:
        outputs.part.close()
        summary = finish(out, queries, classes.names, coco)
    return summary


def run_classes(args: argparse.Namespace, out: Path, queries: list[Query], skipped: list[str]) -> int:
    """``fewshot-seg segment`` with classes; exit status as the 1-class form (0, or 1 when a query failed)."""
    examples = read_examples(args)
    coco = args.format != "png"
    if coco:  # an annotations.json of other classes stops every process alike, before the model loads
        check_annotations(out, examples.names)
    if args.devices is not None:
        # Lightning only when --devices asks for it: the 1-process path stays free of it.
        from fewshot_seg.tools.segment_ddp import run_distributed

        summary, status = run_distributed(args, out, queries, examples, coco)
        if summary is None:  # not rank 0: rank 0 reports for every process
            return status
    else:
        summary = run_one_process(args, out, queries, examples, coco)
    report(summary, out, examples.names, coco)
    report_problems(skipped, summary.failed)
    return 1 if summary.failed else 0


def report(summary: RunSummary, out: Path, names: Sequence[str], coco: bool) -> None:
    """The run's last line: counts, classes, files (and the share of each process under DDP)."""
    c = summary.counts
    files = f"manifest: {out / MANIFEST}"
    if coco:
        from fewshot_seg.coco_export import ANNOTATIONS_FILE

        files += f", annotations: {out / ANNOTATIONS_FILE}"
    print(
        f"{c['written']} label map(s) written, {c['exists']} already there (--overwrite redoes them), "
        f"{c['failed']} failed; classes: {', '.join(names)}; {files}"
    )
    if len(summary.per_rank) > 1 or summary.repeated:
        shares = ", ".join(f"rank {r}: {n}" for r, n in sorted(summary.per_rank.items()))
        print(f"written per process: {shares}; written twice: {len(summary.repeated)}")


__all__ = ["ClassOutputs", "read_examples", "run_classes", "segment_batch"]
