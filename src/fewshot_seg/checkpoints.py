"""Reading the checkpoints a stage builds on, and what they say about themselves.

A Lightning checkpoint of this project carries, besides the weights, ``STAGE_KEY`` (the stage that
wrote it) and the stage module's hyper-parameters (its backbone / POS / Mask Matching configurations,
as plain dicts). Stage 2 reads a stage-1 checkpoint through :func:`read_checkpoint`; a reference
(detectron2-style) MM-Former file is recognised and handed to ``models.convert``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

STAGE_KEY = "fewshot_seg_stage"
"""Checkpoint entry naming the stage that wrote it ("pos" or "mm")."""

STAGE_CLASS = {"pos": "POSModule", "mm": "MMModule"}

PROVENANCE_KEY = "fewshot_seg_provenance"
"""Checkpoint entry recording what trained the model (``lightning.provenance``: code, data, run config)."""


class CheckpointError(ValueError):
    """A checkpoint a run cannot use (missing, unreadable, wrong stage, wrong shapes, wrong data)."""


class Stage1CheckpointError(CheckpointError):
    """A stage-1 checkpoint :class:`~fewshot_seg.lightning.MMModule` cannot use."""


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Mapping[str, Any]:
    """A checkpoint file as a mapping, loaded with ``weights_only=True`` (never executes pickled code).

    Raises:
        CheckpointError: naming ``what`` and the path: missing, not a checkpoint (e.g. a text or image
            file), or holding Python objects a weights-only load refuses. Never suggests
            ``weights_only=False``: a user-supplied file is not trusted with arbitrary code.
    """
    name = f"{what} {str(path)!r}"
    if not os.path.exists(path):
        raise CheckpointError(f"{name} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{name} is a folder; expected a .ckpt / .pth file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (KeyError, IndexError) as err:  # the unpickler met a byte that opens no pickle (a text file)
        raise CheckpointError(
            f"{name} is not a readable PyTorch checkpoint (truncated, or not a checkpoint at all): not a "
            f"PyTorch file ({type(err).__name__} {err} while unpickling)"
        ) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
        text = str(err)
        if "Unsupported global" in text:  # a real pickle, of classes a weights-only load refuses
            found = text.split("Unsupported global:", 1)[1].strip().splitlines()[0][:160]
            raise CheckpointError(
                f"{name} holds Python objects other than tensors and plain containers ({found}); it is not a "
                "checkpoint this project wrote, and it is not loaded with code execution enabled"
            ) from None
        first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
        if "Weights only load failed" in first:  # not a pickle at all (a text file, an image, ...)
            first = "not a PyTorch file"
        raise CheckpointError(
            f"{name} is not a readable PyTorch checkpoint (truncated, or not a checkpoint at all): {first}"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name} holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


def require_lightning_checkpoint(ckpt: Mapping, name: str) -> None:
    """Refuse a file that is no Lightning checkpoint (an ImageNet backbone, a bare state dict) before a
    model is built for it, naming it (``name``: e.g. "--ckpt_path 'x.pth'")."""
    if is_lightning_checkpoint(ckpt):
        return
    keys = [k for k in ckpt if isinstance(k, str)][:3]
    raise CheckpointError(
        f"{name} is not an MM-Former checkpoint of this project (no Lightning 'state_dict'; its first "
        f"entries: {keys}): pass a checkpoint written by `fewshot-seg fit` (<run>/checkpoints/*.ckpt)"
    )


def usable_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files of a run's ``checkpoints/`` folder that can be loaded, newest first.

    Cheap: a file counts when it exists (a symbolic link is followed; a dangling one does not count)
    and is a complete zip archive (a truncated or foreign file is not); temporary ``.*.partial`` files
    never count. Newest by modification time; at equal times ``last.ckpt`` comes first.
    """
    found = []
    for path in Path(folder).glob("*.ckpt"):
        if path.name.startswith(".") or not path.is_file() or not zipfile.is_zipfile(path):
            continue
        found.append((path.stat().st_mtime, path.name == "last.ckpt", path))
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.ckpt`` name in ``folder`` (usable or not, dangling links included), sorted."""
    return sorted(p for p in Path(folder).glob("*.ckpt") if not p.name.startswith("."))


def is_lightning_checkpoint(ckpt: Mapping) -> bool:
    """A checkpoint written by a Lightning ``Trainer`` (or by this project's modules)."""
    return "state_dict" in ckpt and ("pytorch-lightning_version" in ckpt or STAGE_KEY in ckpt)


def checkpoint_stage(ckpt: Mapping) -> str:
    """ "pos" or "mm": the recorded stage, else guessed from the weights (older files)."""
    recorded = ckpt.get(STAGE_KEY)
    if recorded:
        return str(recorded)
    return "mm" if any(k.startswith("mm.") for k in ckpt.get("state_dict", {})) else "pos"


def recorded_hparams(ckpt: Mapping | None) -> Mapping[str, Any]:
    """The stage module's saved hyper-parameters (empty for reference files and older checkpoints)."""
    if ckpt is None or not is_lightning_checkpoint(ckpt):
        return {}
    return ckpt.get("hyper_parameters") or {}


def check_stage1(ckpt: Mapping, path: str) -> None:
    """Refuse a Lightning checkpoint that is not a stage-1 (POSModule) one, naming what it is."""
    stage = checkpoint_stage(ckpt)
    if stage != "pos":
        raise Stage1CheckpointError(
            f"stage1_checkpoint {path!r} is a stage-2 ({stage!r}, MMModule) checkpoint; it expects a "
            "stage-1 POSModule checkpoint. To continue or test a stage-2 run use --ckpt_path instead."
        )
    if not any(k.startswith("pos.") for k in ckpt["state_dict"]):
        raise Stage1CheckpointError(f"stage1_checkpoint {path!r} holds no POS weights (no 'pos.*' keys)")
