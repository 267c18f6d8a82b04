"""The meaning of batch_size: the model's global batch, split over processes and accumulated batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules import DatasetError
from datamodules.base import DEFAULT_BATCH_SIZE, resolve_batch_size
from fewshot_seg.config import OptimizerConfig


def _trainer(world: int, global_batch: int, accumulate: int = 1) -> SimpleNamespace:
    module = SimpleNamespace(optim=OptimizerConfig(batch_size=global_batch))
    return SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate, lightning_module=module)


def test_global_batch_is_split_over_processes_and_accumulation() -> None:
    assert resolve_batch_size(_trainer(1, 8)) == 8
    assert resolve_batch_size(_trainer(2, 8)) == 4 and resolve_batch_size(_trainer(8, 8)) == 1
    assert resolve_batch_size(_trainer(4, 4)) == 1  # stage 2 of the paper on 4 GPUs
    assert resolve_batch_size(_trainer(2, 8, accumulate=2)) == 2  # accumulation divides it further
    assert resolve_batch_size(None) == DEFAULT_BATCH_SIZE
    with pytest.raises(DatasetError, match=r"optim.batch_size=8 cannot be split over 3 process\(es\) x 1"):
        resolve_batch_size(_trainer(3, 8))
