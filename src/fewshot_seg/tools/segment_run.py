"""What makes ``fewshot-seg segment``'s ``--out`` one run's folder: the checks before the model loads,
the run record, the folder lock, a finished mask read back, the overlays a re-run draws.

* **Run record** ``OUT/segment_run.json`` (:func:`run_record`): the checkpoint's identity (SHA-256 and
  size), each class's support (image, mask) hashes, the model input size and the precision; the
  classes are a dict (class name -> supports; one class is ``"object"``), so an N-class run records
  them the same way. A run whose record differs from the folder's (another checkpoint, other supports,
  another ``--image-size`` or ``--precision``) is refused, naming what differs, unless ``--overwrite``
  (every query is then redone and the record replaced): a folder never mixes the masks of two models.
  A folder with masks but no record (made before records existed) is refused the same way.
* **Lock** ``OUT/.segment.lock``: the lock the fits take on their run folder (``fewshot_seg.folder_lock``),
  so two runs into one folder never write over each other.
* **Finished masks**: an existing ``*_mask.png`` that cannot be read (truncated, corrupt) is redone,
  not a reason to stop.
* **Overlays**: with ``--overlay``, a finished mask without its overlay (an earlier run without
  ``--overlay``, a kill between the mask and its overlay) gets it drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewshot_seg.atomic import write_text_atomic
from fewshot_seg.errors import DatasetError, reading
from fewshot_seg.folder_lock import RunFolderError, RunLock
from fewshot_seg.multiclass import ClassExamples
from fewshot_seg.outputs import OUTPUT_SUFFIXES, OutputError, save_png_atomic
from fewshot_seg.tools.common import ToolError
from fewshot_seg.user_images import MAX_CLASS_VALUES, is_mask_file, read_user_image, read_user_mask_and_rule
from fewshot_seg.visualize import prediction_overlay

RUN_RECORD = "segment_run.json"
LOCK_NAME = ".segment.lock"
SINGLE_CLASS = "object"
"""The class name of a one-class run in the record."""

SupportFiles = Mapping[str, Sequence[tuple[str | os.PathLike, str | os.PathLike]]]
"""class name -> its supports' (image path, mask path)."""


# ------------------------------------------------------------------------------ before the model loads
def check_queries_not_out(sources: Sequence[str], out: Path) -> None:
    """Refuse ``--out`` equal to a queries folder: its queries would all count as outputs (nothing found)."""
    for source in sources:
        if Path(source).is_dir() and Path(source).resolve() == out.resolve():
            raise OutputError(
                f"--out {out} is the queries folder {source}: the masks would be written among the queries; "
                "choose another folder (a sub-folder of it is fine)"
            )


def check_support_order(pairs: Sequence[Sequence[str]]) -> None:
    """Refuse ``--support MASK IMAGE``: the first file named like a mask (``*_mask.*``) and the second not,
    or the first a two-value grey picture and the second a colour photo."""
    for image, mask in pairs:
        if is_mask_file(Path(image)) and not is_mask_file(Path(mask)):
            why = f"{image} is named like a mask"
        elif _mask_then_photo(image, mask):
            why = f"{image} holds at most two grey values, {mask} is a colour picture"
        else:
            continue
        raise ToolError(
            f"--support {image} {mask}: the image comes first, then its mask ({why}): "
            f"--support {mask} {image}"
        )


def _mask_then_photo(first: str, second: str) -> bool:
    try:
        a, b = read_user_image(first), read_user_image(second)
    except DatasetError:
        return False  # the Segmenter names an unreadable support
    grey_a = (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    colour_b = not ((b[..., 0] == b[..., 1]).all() and (b[..., 1] == b[..., 2]).all())
    return bool(
        grey_a and colour_b and len(np.unique(a[..., 0])) <= 2 and len(np.unique(b)) > MAX_CLASS_VALUES
    )


def report_mask_rules(masks: Sequence[str]) -> list[str]:
    """One line per support mask: the rule it is read by (``user_images.mask_rule``)."""
    lines = []
    for mask in masks:
        _, rule = read_user_mask_and_rule(mask, "support mask")
        lines.append(f"support mask {mask}: read as {rule}")
    return lines


# ------------------------------------------------------------------------------ the run record
def file_hash(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a file's SHA-256 (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with reading(path, "file", kind="a file"), open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()[:16]


def run_record(
    ckpt: str | os.PathLike, classes: Mapping[str, list[list[str]]], image_size: int, precision: str
) -> dict:
    """What makes a folder's masks: compared with the folder's record on a re-run.

    Args:
        classes: per class name, one ``[image hash, mask hash]`` per support (:func:`support_file_hashes`
            for files named on the command line, :func:`support_array_hashes` for supports read by class).
    """
    return {
        "checkpoint": {"sha256": file_hash(ckpt), "bytes": os.path.getsize(ckpt)},
        "classes": {name: [list(pair) for pair in pairs] for name, pairs in classes.items()},
        "image_size": int(image_size),
        "precision": str(precision),
    }


def support_file_hashes(supports: SupportFiles) -> dict[str, list[list[str]]]:
    """Per class, the ``[image, mask]`` file hashes of its supports."""
    return {
        name: [[file_hash(image), file_hash(mask)] for image, mask in pairs]
        for name, pairs in supports.items()
    }


def support_array_hashes(examples: ClassExamples) -> dict[str, list[list[str]]]:
    """Per class, the hashes of its supports as read (a class-index mask gives each class its own mask)."""

    def digest(array: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()[
            :16
        ]

    return {
        name: [[digest(ex.image), digest(ex.mask)] for ex in examples.examples[name]]
        for name in examples.names
    }


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def check_run_record(out: Path, record: dict, overwrite: bool) -> None:
    """Refuse a run other than the one that made ``out`` (unless ``overwrite``), then record this one.

    Raises:
        OutputError: naming the folder and what differs (checkpoint, classes, image_size, precision).
    """
    path = out / RUN_RECORD
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {"unreadable": True}
        differs = _differences(earlier if isinstance(earlier, dict) else {}, record)
    else:
        has_masks = out.is_dir() and any(p.name.endswith(OUTPUT_SUFFIXES) for p in out.rglob("*"))
        differs = ["no record of the run that made them"] if has_masks else []
    if differs and not overwrite:
        raise OutputError(
            f"output folder {out} holds the masks of another run ({path}; differs: {', '.join(differs)}): "
            "choose another --out, or pass --overwrite to redo every query with this run"
        )
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def lock_output(out: Path) -> RunLock:
    """Take ``OUT/.segment.lock`` (the fits' run-folder lock); OutputError if another run holds it."""
    try:
        return RunLock(out, LOCK_NAME, "segment run").acquire()
    except RunFolderError as err:
        raise OutputError(str(err)) from None


# ------------------------------------------------------------------------------ finished outputs
def finished_fraction(mask: Path) -> float | None:
    """The foreground fraction of a finished ``*_mask.png``; None when missing or unreadable (redo it)."""
    if not mask.is_file():
        return None
    try:
        with reading(mask, "finished mask"), Image.open(mask) as im:
            return float((np.asarray(im) > 0).mean())
    except DatasetError:
        return None


def draw_missing_overlays(queries: Sequence[Any]) -> None:
    """Draw the overlay of every finished query (``status == "exists"``) that has none; one that cannot
    be drawn (query or mask unreadable now) is marked failed, naming the file.

    Args:
        queries: objects with ``path``, ``mask``, ``overlay`` and ``status`` (``tools.segment.Query``).
    """
    for q in queries:
        if q.status != "exists" or q.overlay.is_file():
            continue
        try:
            image = read_user_image(q.path, "query")
            with reading(q.mask, "finished mask"), Image.open(q.mask) as im:
                mask = np.asarray(im) > 0
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"finished mask {q.mask} is not the size of its query")
            save_png_atomic(prediction_overlay(image, mask), q.overlay)
        except DatasetError as err:
            q.status = f"failed: overlay not drawn: {err}"


__all__ = [
    "LOCK_NAME",
    "RUN_RECORD",
    "SINGLE_CLASS",
    "check_queries_not_out",
    "check_run_record",
    "check_support_order",
    "draw_missing_overlays",
    "file_hash",
    "finished_fraction",
    "lock_output",
    "report_mask_rules",
    "run_record",
]
