"""LightningModules (stage 1 POS, stage 2 Mask Matching), callbacks and optimiser helpers."""

from fewshot_seg.checkpoints import CheckpointError, Stage1CheckpointError
from fewshot_seg.lightning.callbacks import BestCheckpoint, FreezeModules, LearningRateLogger, StepProgressBar
from fewshot_seg.lightning.mm_module import MMModule
from fewshot_seg.lightning.pos_module import POSModule

__all__ = [
    "BestCheckpoint",
    "CheckpointError",
    "FreezeModules",
    "LearningRateLogger",
    "MMModule",
    "POSModule",
    "Stage1CheckpointError",
    "StepProgressBar",
]
