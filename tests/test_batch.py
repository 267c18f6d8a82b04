"""The meaning of batch_size: the model's global batch, split over processes and accumulated batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules import DatasetError
from datamodules.base import DEFAULT_BATCH_SIZE, resolve_batch_size
from fewshot_seg.config import OptimizerConfig


def _trainer(world: int, global_batch: int, accumulate: int = 1) -> SimpleNamespace:
    # Any model with a global_batch_size (the GlobalBatchModel contract of fewshot_seg.contracts).
    module = SimpleNamespace(global_batch_size=OptimizerConfig(batch_size=global_batch).batch_size)
    return SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate, lightning_module=module)


def test_global_batch_is_split_over_processes_and_accumulation() -> None:
    assert resolve_batch_size(_trainer(1, 8)) == 8
    assert resolve_batch_size(_trainer(2, 8)) == 4 and resolve_batch_size(_trainer(8, 8)) == 1
    assert resolve_batch_size(_trainer(4, 4)) == 1  # stage 2 of the paper on 4 GPUs
    assert resolve_batch_size(_trainer(2, 8, accumulate=2)) == 2  # accumulation divides it further
    assert resolve_batch_size(None) == DEFAULT_BATCH_SIZE
    with pytest.raises(DatasetError, match=r"optim.batch_size=8 cannot be split over 3 process\(es\) x 1"):
        resolve_batch_size(_trainer(3, 8))


def test_stage_modules_fulfil_the_contracts(synthetic_root) -> None:
    from datamodules import SyntheticDataModule
    from fewshot_seg.config import BackboneConfig
    from fewshot_seg.contracts import GlobalBatchModel, ScoredClassesData, data_class_ids, model_global_batch
    from fewshot_seg.lightning import MMModule

    model = MMModule(backbone=BackboneConfig(name="resnet18", weights=None), optim={"batch_size": 6})
    dm = SyntheticDataModule(root=str(synthetic_root))
    assert isinstance(model, GlobalBatchModel) and isinstance(dm, ScoredClassesData)
    trainer = SimpleNamespace(lightning_module=model, datamodule=dm)
    assert model_global_batch(trainer) == 6 and data_class_ids(trainer) == dm.novel_classes
