"""Test results: the run folder, ``results.json`` / ``results.csv`` and the per-class table."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def run_dir(trainer: Any) -> Path:
    """The folder of this run, where checkpoints of the first logger also go.

    CSV/TensorBoard: the logger's version folder; other loggers (W&B): ``save_dir/name/version``
    (``Trainer.log_dir`` would give the bare ``save_dir``, shared by every run); no logger:
    ``default_root_dir``. Unlike ``Trainer.log_dir`` this does not broadcast, so rank 0 may call
    it alone.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    loggers = getattr(trainer, "loggers", None) or []
    if loggers:
        lg = loggers[0]
        if isinstance(lg, (CSVLogger, TensorBoardLogger)):
            return Path(lg.log_dir)
        save_dir, name, version = lg.save_dir, lg.name, lg.version
        if save_dir and name is not None and version is not None:
            return Path(save_dir) / str(name) / str(version)
        if save_dir:
            return Path(save_dir)
    return Path(getattr(trainer, "default_root_dir", None) or ".")


def summarize(results: Mapping[str, Mapping], stage: str, datamodule: Any, wall_time_s: float) -> dict:
    """The ``results.json`` summary of one test run.

    Args:
        results: metric name (``"model"``, ``"oracle"``, ``"baseline"``) -> ``FewShotIoU.compute()``;
            the first one is the run's main result.
        stage: ``"pos"`` or ``"mm"``.
        datamodule: the run's DataModule (name, fold, shot and class names are read from it), or None.
        wall_time_s: duration of the test loop.
    """
    main_name = next(iter(results))
    main = results[main_name]
    ids = list(main["class_iou"])
    # Every metric of a run scores the same episodes: a class without any has no IoU in any of them.
    unscored = {int(c) for c in main.get("unscored", ())}
    names = {c: datamodule.class_name(c) for c in ids} if hasattr(datamodule, "class_name") else {}
    summary: dict[str, Any] = {
        "stage": stage,
        "dataset": getattr(datamodule, "name", type(datamodule).__name__) if datamodule is not None else None,
        "fold": getattr(datamodule, "fold", None),
        # A folder of supports knows its shot count only once read (``episode_shot``).
        "shot": getattr(datamodule, "episode_shot", getattr(datamodule, "shot", None)),
        "miou": float(main["miou"]),
        "fbiou": float(main["fbiou"]),
        "class_iou": _class_ious(main, unscored),
        "class_episodes": {str(c): int(n) for c, n in main["class_episodes"].items()},
        "class_names": {str(c): n for c, n in names.items()},
        "unscored_classes": sorted(unscored),
        "wall_time_s": wall_time_s,
        **evaluation_record(datamodule),
    }
    for other in ("oracle", "baseline"):
        res = results.get(other)
        summary[f"{other}_miou"] = float(res["miou"]) if res is not None else None
        summary[f"{other}_fbiou"] = float(res["fbiou"]) if res is not None else None
        if res is not None and other != main_name:
            summary[f"{other}_class_iou"] = _class_ious(res, unscored)
    return summary


def _class_ious(result: Mapping, unscored: set[int]) -> dict[str, float | None]:
    """``{class id: IoU}`` of a metric result, None (JSON null) for a class drawn in no episode."""
    return {str(c): None if int(c) in unscored else float(v) for c, v in result["class_iou"].items()}


def evaluation_record(datamodule: Any) -> dict[str, Any]:
    """Which episodes were scored: the protocol's name and the test list's file and sha256."""
    protocol = getattr(datamodule, "eval_protocol", None)
    record: dict[str, Any] = {"protocol": getattr(protocol, "name", getattr(datamodule, "protocol", None))}
    list_file = getattr(datamodule, "episode_list_file", None)
    if callable(list_file):
        path = Path(list_file("test"))
        record["episode_list"] = str(path)
        record["episode_list_sha256"] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        )
    return record


def _fold(fold: int | None) -> str:
    """`` fold k`` of a dataset split into folds; nothing for a folder of the user's images."""
    return "" if fold is None else f" fold {fold}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def class_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per class: id, name, episodes, model / oracle / baseline IoU (percent)."""
    rows = []
    for c, iou in summary["class_iou"].items():
        rows.append(
            {
                "class_id": int(c),
                "name": summary.get("class_names", {}).get(c, ""),
                "episodes": summary.get("class_episodes", {}).get(c, ""),
                "iou": iou,
                "oracle_iou": summary.get("oracle_class_iou", {}).get(c),
                "baseline_iou": summary.get("baseline_class_iou", {}).get(c),
            }
        )
    return rows


def format_class_table(summary: dict) -> str:
    """Plain-text per-class table followed by the mIoU / FB-IoU lines."""
    head = f"{'class':>5}  {'name':<14} {'episodes':>8} {'IoU':>7} {'oracle':>7} {'baseline':>8}"
    lines = [head, "-" * len(head)]
    for r in class_rows(summary):
        lines.append(
            f"{r['class_id']:>5}  {str(r['name'])[:14]:<14} {r['episodes']!s:>8} {_fmt(r['iou']):>7} "
            f"{_fmt(r['oracle_iou']):>7} {_fmt(r['baseline_iou']):>8}"
        )
    lines.append("-" * len(head))
    unscored = summary.get("unscored_classes") or []
    if unscored:
        names = summary.get("class_names", {})
        named = ", ".join(f"{c} {names[str(c)]}" if names.get(str(c)) else str(c) for c in unscored)
        lines.append(
            f"not scored (no episode): {named}; the mIoUs are over the other "
            f"{len(summary['class_iou']) - len(unscored)} classes"
        )
    lines.append(
        f"mIoU {_fmt(summary['miou'])}  FB-IoU {_fmt(summary['fbiou'])}  "
        f"oracle mIoU {_fmt(summary.get('oracle_miou'))}  "
        f"baseline mIoU {_fmt(summary.get('baseline_miou'))}  "
        f"({summary.get('dataset')}{_fold(summary.get('fold'))} {summary.get('shot')}-shot, "
        f"{summary.get('wall_time_s', 0.0):.1f} s)"
    )
    return "\n".join(lines)


def write_results(summary: dict, folder: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (the whole summary) and ``results.csv`` (per-class rows + a mean row)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "results.json"
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    csv_path = folder / "results.csv"
    rows = class_rows(summary)
    fields = ["class_id", "name", "episodes", "iou", "oracle_iou", "baseline_iou"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(
            {
                "class_id": "mean",
                "name": "",
                "episodes": sum(int(r["episodes"]) for r in rows if r["episodes"] != ""),
                "iou": summary["miou"],
                "oracle_iou": summary.get("oracle_miou"),
                "baseline_iou": summary.get("baseline_miou"),
            }
        )
    return json_path, csv_path


def report_results(summary: dict, trainer: Any) -> Path | None:
    """Print the per-class table and write ``results.json`` / ``.csv`` into the run folder (global rank 0).

    Returns:
        The ``results.json`` path on global rank 0, else None.
    """
    if not trainer.is_global_zero:
        return None
    print(format_class_table(summary))
    folder = run_dir(trainer)
    write_results(summary, folder)
    print(f"results written to {folder / 'results.json'}")
    return folder / "results.json"
