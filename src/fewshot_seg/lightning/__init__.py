"""LightningModules (stage 1 POS, stage 2 Mask Matching), callbacks and optimiser helpers."""

from fewshot_seg.lightning.callbacks import FreezeModules
from fewshot_seg.lightning.mm_module import MMModule, Stage1CheckpointError
from fewshot_seg.lightning.pos_module import POSModule

__all__ = ["FreezeModules", "MMModule", "POSModule", "Stage1CheckpointError"]
