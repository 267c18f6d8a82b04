"""The meaning of batch_size: the model's global batch, split over the processes (multi-GPU semantics)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules import DatasetError
from datamodules.base import DEFAULT_BATCH_SIZE, resolve_batch_size
from fewshot_seg.config import OptimizerConfig


def _trainer(world: int, global_batch: int) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=world, lightning_module=SimpleNamespace(optim=OptimizerConfig(batch_size=global_batch))
    )


def test_global_batch_is_split_over_processes() -> None:
    assert resolve_batch_size(_trainer(1, 8)) == 8
    assert resolve_batch_size(_trainer(2, 8)) == 4 and resolve_batch_size(_trainer(8, 8)) == 1
    assert resolve_batch_size(_trainer(4, 4)) == 1  # stage 2 of the paper on 4 GPUs
    assert resolve_batch_size(None) == DEFAULT_BATCH_SIZE
    with pytest.raises(DatasetError, match=r"optim.batch_size=8 cannot be split over 3 processes"):
        resolve_batch_size(_trainer(3, 8))
