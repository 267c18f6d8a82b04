"""Provenance: what data trained a model, recorded in every checkpoint and result, and checked before use.

A model trained on some classes of a dataset must not be scored on those classes as "novel": stage 2
from a fold-0 stage-1 model at fold 1, or a fold-1 model tested on fold 0, would report a few-shot
score on classes it was trained on. Every checkpoint records the data it was trained on
(:data:`PROVENANCE_KEY`); stage 2, ``test`` and ``predict`` compare it with their DataModule and refuse a
mismatch unless the run opts in (``allow_class_overlap``), for deliberate cross-dataset transfer.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# PROVENANCE_KEY is defined beside the other checkpoint keys; re-exported for the stage modules.
from fewshot_seg.checkpoints import PROVENANCE_KEY as PROVENANCE_KEY
from fewshot_seg.checkpoints import CheckpointError


def data_record(datamodule: Any) -> dict[str, Any] | None:
    """The DataModule's own description (``provenance()``), or None for DataModules without a class split."""
    describe = getattr(datamodule, "provenance", None)
    return describe() if callable(describe) else None


@functools.cache
def code_version() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit (with ``-dirty`` for local changes)."""
    from fewshot_seg import __version__

    commit = None
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package_version": __version__, "git_commit": commit}


def trained_on(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"dataset", "fold", "classes", "class_names"}``: every class a model's weights saw in training."""
    if not record:
        return None
    return record.get("trained_on")


def merge_trained_on(previous: Mapping | None, data: Mapping | None) -> dict[str, Any] | None:
    """What a model trained on ``data`` after ``previous`` (its stage-1 model's training) has seen."""
    if data is None:
        return dict(previous) if previous else None
    mine = {
        "dataset": data["dataset"],
        "fold": data["fold"],
        "classes": list(data["base_classes"]),
        # Names of the trained classes only: across datasets the overlap is found by name.
        "class_names": {
            c: n for c, n in data.get("class_names", {}).items() if int(c) in set(data["base_classes"])
        },
    }
    if not previous:
        return mine
    if previous.get("dataset") != mine["dataset"]:
        # Different datasets: keep both, named; class ids are only comparable within one dataset.
        return {**mine, "also": [dict(previous)]}
    classes = sorted(set(previous.get("classes", [])) | set(mine["classes"]))
    names = {**previous.get("class_names", {}), **mine["class_names"]}
    folds = sorted({previous.get("fold"), mine["fold"]} - {None})
    return {**mine, "classes": classes, "class_names": names, "fold": folds[0] if len(folds) == 1 else folds}


def class_overlap(trained: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """Which of ``data``'s novel classes the model was trained on.

    Within one dataset by class id; across datasets by class name (case and spaces ignored).
    """
    novel = [int(c) for c in data["novel_classes"]]
    names = {int(k): v for k, v in data.get("class_names", {}).items()}
    overlap: list[int] = []
    for source in [trained, *trained.get("also", [])]:
        if source.get("dataset") == data["dataset"]:
            overlap += [c for c in novel if c in set(source.get("classes", []))]
        else:
            seen = {_norm(n) for n in source.get("class_names", {}).values()}
            overlap += [c for c in novel if _norm(names.get(c, "")) in seen]
    overlap = sorted(set(overlap))
    return {
        "trained_dataset": trained.get("dataset"),
        "trained_fold": trained.get("fold"),
        "tested_dataset": data["dataset"],
        "tested_fold": data.get("fold"),
        "overlap_classes": overlap,
        "overlap_names": [names.get(c, str(c)) for c in overlap],
    }


def _norm(name: str) -> str:
    return "".join(name.lower().split())


def check_class_split(
    trained: Mapping[str, Any] | None, data: Mapping[str, Any] | None, what: str, allow: bool
) -> dict | None:
    """Refuse to use a model on data whose novel classes it may have been trained on.

    Args:
        trained: :func:`trained_on` of the model (None: no record, e.g. a reference checkpoint).
        data: :func:`data_record` of the DataModule (None: no class split, e.g. a folder of images).
        what: the command or stage, for the message.
        allow: ``allow_class_overlap``: use it anyway (the overlap is returned and reported).

    Returns:
        The :func:`class_overlap` report, or None when there is nothing to compare.

    Raises:
        CheckpointError: another dataset, another fold or classes seen in training, unless ``allow``.
    """
    if trained is None or data is None:
        return None
    report = class_overlap(trained, data)
    same_dataset = trained.get("dataset") == data["dataset"]
    folds = trained.get("fold") if isinstance(trained.get("fold"), list) else [trained.get("fold")]
    if allow or (same_dataset and data.get("fold") in folds and not report["overlap_classes"]):
        return report
    model = f"the model was trained on {trained.get('dataset')!r} fold {trained.get('fold')}"
    if not same_dataset:
        problem = f"{model}, this DataModule is {data['dataset']!r} fold {data.get('fold')}: class ids differ"
    else:
        problem = f"{model}, this DataModule is fold {data.get('fold')}"
    if report["overlap_classes"]:
        problem += (
            f"; its novel classes {report['overlap_classes']} ({', '.join(report['overlap_names'])}) were "
            "training classes of the model, so the score would not be few-shot"
        )
    raise CheckpointError(
        f"{what}: {problem}. For deliberate transfer set --model.init_args.allow_class_overlap=true "
        "(the overlap is then reported in results.json)."
    )
