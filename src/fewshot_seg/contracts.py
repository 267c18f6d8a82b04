"""The three run-time contracts between an episode DataModule and a stage module (docs/DESIGN.md).

All are read through the Trainer at run time, not linked in the configuration, because what they carry
is only known there: the per-process batch is the model's global batch divided by the processes and
accumulated batches of *this* run, and the class ids to score are the DataModule's fold (or a folder's
one class) after its configuration is final.

* :class:`GlobalBatchModel`: a DataModule whose ``batch_size`` is unset asks the model for its global
  batch (``EpisodeModule.global_batch_size`` = ``optim.batch_size``) and splits it
  (``datamodules.base.resolve_batch_size``).
* :class:`ScoredClassesData`: a stage module without ``eval_class_ids`` scores the DataModule's
  ``novel_classes`` (``EpisodeModule.setup``).
* :class:`SupportsModel`: a model that trains on the query alone (stage 1) gets training episodes
  without supports (``EpisodeDataModule.training_shot`` = 0), so none is read, decoded or augmented.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class GlobalBatchModel(Protocol):
    """A LightningModule that says how many episodes one optimisation step holds over all processes."""

    @property
    def global_batch_size(self) -> int: ...


@runtime_checkable
class ScoredClassesData(Protocol):
    """A DataModule that says which (1-based, global) class ids its evaluation episodes are about."""

    @property
    def novel_classes(self) -> list[int]: ...


@runtime_checkable
class SupportsModel(Protocol):
    """A LightningModule that says whether its training step reads the supports of an episode."""

    trains_with_supports: bool


def model_trains_with_supports(trainer: Any) -> bool:
    """Whether the attached model's training uses supports; True without a model (full episodes)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    return bool(module.trains_with_supports) if isinstance(module, SupportsModel) else True


def model_global_batch(trainer: Any) -> int | None:
    """The attached model's global batch, or None (no Trainer, no model, or a model without one)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    return module.global_batch_size if isinstance(module, GlobalBatchModel) else None


def data_class_ids(trainer: Any) -> list[int] | None:
    """The attached DataModule's scored class ids, or None."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    ids = dm.novel_classes if isinstance(dm, ScoredClassesData) else None
    return [int(c) for c in ids] if ids else None
