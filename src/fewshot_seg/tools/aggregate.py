"""Gather per-fold ``results.json`` files into one table (per fold + mean), Markdown and CSV.

    python -m fewshot_seg.tools.aggregate runs/pascal_1shot [more folders or files] [-o summary]

Every ``results.json`` found under the given paths is one row; rows are grouped by
(dataset, shot, stage) and sorted by fold; the mean row is the plain average of the fold values
(SPEC §6: the 4-fold mean is the average of the fold mIoUs).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

COLUMNS = ("miou", "fbiou", "oracle_miou", "baseline_miou")


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """``results.json`` files: the paths themselves when files, else found recursively under them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return found


def aggregate(files: Sequence[Path]) -> list[dict]:
    """Rows (one per file, then one mean row per group) with dataset, shot, stage, fold and the metrics."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for f in files:
        res = json.loads(f.read_text())
        row = {
            "dataset": res.get("dataset"),
            "shot": res.get("shot"),
            "stage": res.get("stage"),
            "fold": res.get("fold"),
        }
        row.update({c: res.get(c) for c in COLUMNS})
        row["path"] = str(f)
        groups[(str(row["dataset"]), str(row["shot"]), str(row["stage"]))].append(row)
    rows: list[dict] = []
    for key in sorted(groups):
        fold_rows = sorted(groups[key], key=lambda r: (r["fold"] is None, r["fold"]))
        rows.extend(fold_rows)
        mean = {
            "dataset": fold_rows[0]["dataset"],
            "shot": fold_rows[0]["shot"],
            "stage": fold_rows[0]["stage"],
            "fold": "mean",
            "path": "",
        }
        for c in COLUMNS:
            vals = [r[c] for r in fold_rows if r[c] is not None]
            mean[c] = sum(vals) / len(vals) if vals and len(vals) == len(fold_rows) else None
        rows.append(mean)
    return rows


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def to_markdown(rows: Sequence[dict]) -> str:
    head = ["dataset", "shot", "stage", "fold", "mIoU", "FB-IoU", "oracle mIoU", "baseline mIoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["shot"], r["stage"], r["fold"], *(r[c] for c in COLUMNS)]
        text = [_fmt(c) for c in cells]
        if r["fold"] == "mean":
            text = [f"**{t}**" for t in text]
        lines.append("| " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", "shot", "stage", "fold", *COLUMNS, "path"])
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders (searched recursively) or results.json files")
    parser.add_argument("-o", "--output", default=None, help="write <output>.md and <output>.csv")
    args = parser.parse_args(argv)
    files = find_results(args.paths)
    if not files:
        parser.error("no results.json found")
    rows = aggregate(files)
    md = to_markdown(rows)
    print(md, end="")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        write_csv(rows, out.with_suffix(".csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
