"""The results table: fold summaries of ``train_fold`` -> the paper's layout, Markdown and CSV.

    python -m fewshot_seg.tools.aggregate runs/pascal [more folders or files] [-o runs/pascal/summary]

Reads only *fold summaries* (``summary-<K>shot.json``, one per dataset, fold, shot and seed, written by
``train_fold``), never a test run's own ``results.json``, so a fold counts once. Per (dataset, protocol,
shot) it prints a block with rows model / oracle / heuristic baseline and columns fold 0..3 and mean
(SPEC §6: the 4-fold mean is the average of the fold mIoUs); with several seeds a cell is
``mean ± std`` over the seeds. Two protocols are never averaged together; two summaries of the same
(dataset, protocol, fold, shot, seed) are refused (``--drop-duplicates`` keeps the newest, with a
warning); an unreadable file is named. Runs that ``train_fold --force`` moved into a ``replaced-<time>/``
folder are not read (name such a file to read it). ``--classes`` adds a block per (dataset, protocol, shot)
with the model's IoU of each class by name (e.g. the categories of your own COCO export) and fold.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SUMMARY_GLOB = "summary-*shot.json"
SUMMARY_KIND = "fold_summary"
ROWS = (("model", "miou"), ("oracle", "oracle_miou"), ("heuristic baseline", "baseline_miou"))
CSV_COLUMNS = (
    "dataset",
    "protocol",
    "fold",
    "shot",
    "seed",
    "miou",
    "fbiou",
    "oracle_miou",
    "baseline_miou",
    "path",
)
# Fields a summary must hold with these JSON types (None allowed where optional): a row of the table.
FIELD_TYPES = (
    *((k, int, "an integer") for k in ("fold", "shot", "seed")),
    *((k, (int, float), "a number") for k in ("miou", "fbiou", "oracle_miou", "baseline_miou")),
    *((k, str, "a string") for k in ("dataset", "protocol")),
)


class AggregateError(ValueError):
    """Summaries that cannot make one honest table (unreadable, duplicated)."""


def summary_name(shot: int) -> str:
    """File name of a fold summary for ``shot``."""
    return f"summary-{shot}shot.json"


def find_summaries(paths: Iterable[str | Path]) -> list[Path]:
    """Fold summaries: the given files, and every ``summary-<K>shot.json`` under the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            # Not the runs that train_fold --force moved into <run-dir>/replaced-<time>/.
            found.extend(
                sorted(
                    f
                    for f in p.rglob(SUMMARY_GLOB)
                    if not any(part.startswith("replaced-") for part in f.relative_to(p).parts[:-1])
                )
            )
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return found


def read_summary(path: Path) -> dict[str, Any]:
    """One fold summary, checked; an AggregateError names the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AggregateError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != SUMMARY_KIND:
        raise AggregateError(f'{path}: not a fold summary of train_fold (no "kind": "{SUMMARY_KIND}")')
    missing = [k for k in ("dataset", "fold", "shot", "miou") if data.get(k) is None]
    if missing:
        raise AggregateError(f"{path}: missing {missing}")
    for key, kinds, what in FIELD_TYPES:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise AggregateError(f'{path}: "{key}" is the {type(value).__name__} {value!r}, expected {what}')
    return data


def collect(files: Sequence[Path], drop_duplicates: bool = False) -> list[dict[str, Any]]:
    """One row per (dataset, protocol, fold, shot, seed); duplicates refused or dropped (newest kept)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for f in files:
        s = read_summary(f)
        row = {
            "dataset": s["dataset"],
            "protocol": s.get("protocol") or "spec",
            "fold": int(s["fold"]),
            "shot": int(s["shot"]),
            "seed": int(s.get("seed") or 0),
            "miou": s["miou"],
            "fbiou": s.get("fbiou"),
            "oracle_miou": s.get("oracle_miou"),
            "baseline_miou": s.get("baseline_miou"),
            "path": str(f),
            "_mtime": f.stat().st_mtime,
            "_class_iou": s.get("class_iou") or {},
            "_class_names": s.get("class_names") or {},
        }
        key = tuple(row[k] for k in ("dataset", "protocol", "fold", "shot", "seed"))
        if key in rows:
            other = rows[key]
            if not drop_duplicates:
                raise AggregateError(
                    f"two summaries of {dict(zip(('dataset', 'protocol', 'fold', 'shot', 'seed'), key))}: "
                    f"{other['path']} and {f} (remove one, or pass --drop-duplicates to keep the newest)"
                )
            keep, drop = (row, other) if row["_mtime"] >= other["_mtime"] else (other, row)
            print(
                f"warning: duplicate summary {drop['path']} dropped (keeping {keep['path']})", file=sys.stderr
            )
            rows[key] = keep
        else:
            rows[key] = row
    return sorted(rows.values(), key=lambda r: (r["dataset"], r["protocol"], r["shot"], r["fold"], r["seed"]))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def blocks(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by (dataset, protocol, shot): one table block each."""
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["dataset"], r["protocol"], r["shot"])].append(r)
    return dict(out)


def fold_means(block: Sequence[dict[str, Any]], column: str) -> dict[int, list[float]]:
    """Per seed, the mean over the folds present (only seeds that have every fold of the block)."""
    folds = sorted({r["fold"] for r in block})
    by_seed: dict[int, dict[int, float]] = defaultdict(dict)
    for r in block:
        if r[column] is not None:
            by_seed[r["seed"]][r["fold"]] = r[column]
    return {
        seed: [statistics.mean(v[f] for f in folds)] for seed, v in by_seed.items() if set(v) == set(folds)
    }


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The paper's layout: per block, rows model / oracle / baseline x columns fold 0..3 and mean."""
    parts = []
    for (dataset, protocol, shot), block in blocks(rows).items():
        folds = sorted({r["fold"] for r in block})
        seeds = sorted({r["seed"] for r in block})
        title = f"**{dataset}, {shot}-shot, protocol {protocol}** (mIoU %; seeds {', '.join(map(str, seeds))}"
        title += ", mean ± std over seeds)" if len(seeds) > 1 else ")"
        head = ["", *(f"fold {f}" for f in folds), "mean"]
        lines = [title, "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for label, column in ROWS:
            cells = [
                _cell([r[column] for r in block if r["fold"] == f and r[column] is not None]) for f in folds
            ]
            means = [m[0] for m in fold_means(block, column).values()]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_cell(means)}** |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_class_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Per block, the model's IoU of each class (its name from the summaries) x fold (``--classes``)."""
    parts = []
    for (dataset, protocol, shot), block in blocks(rows).items():
        folds = sorted({r["fold"] for r in block})
        names: dict[str, str] = {}
        for r in block:
            names.update(r["_class_names"])
        classes = sorted({c for r in block for c in r["_class_iou"]}, key=int)
        head = ["class", *(f"fold {f}" for f in folds)]
        lines = [
            f"**{dataset}, {shot}-shot, protocol {protocol}: IoU % per class (model)**",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(folds),
        ]
        for c in classes:
            cells = [
                _cell([r["_class_iou"][c] for r in block if r["fold"] == f and c in r["_class_iou"]])
                for f in folds
            ]
            lines.append(f"| {names.get(c, c)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row, then a ``mean`` row per (dataset, protocol, shot) and seed over the block's folds."""
    out = [{k: r[k] for k in CSV_COLUMNS} for r in rows]
    for (dataset, protocol, shot), block in blocks(rows).items():
        per_seed = {c: fold_means(block, c) for c in ("miou", "fbiou", "oracle_miou", "baseline_miou")}
        for seed in sorted(per_seed["miou"]):
            mean = {
                "dataset": dataset,
                "protocol": protocol,
                "fold": "mean",
                "shot": shot,
                "seed": seed,
                "path": "",
            }
            for c, values in per_seed.items():
                mean[c] = values[seed][0] if seed in values else None
            out.append(mean)
    return out


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(to_csv_rows(rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="run folders (searched recursively) or summary files")
    parser.add_argument("-o", "--output", default=None, help="write <output>.md and <output>.csv")
    parser.add_argument(
        "--drop-duplicates", action="store_true", help="keep the newest of duplicated summaries (warns)"
    )
    parser.add_argument(
        "--classes",
        action="store_true",
        help="add the per-class IoU table (class names as the summaries give)",
    )
    args = parser.parse_args(argv)
    try:
        rows = collect(find_summaries(args.paths), args.drop_duplicates)
    except (AggregateError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(
            f"error: no {SUMMARY_GLOB} under {', '.join(args.paths)} (run train_fold first)", file=sys.stderr
        )
        return 2
    md = to_markdown(rows) + ("\n" + to_class_markdown(rows) if args.classes else "")
    print(md, end="")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        write_csv(rows, out.with_suffix(".csv"))
        print(f"table written to {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
