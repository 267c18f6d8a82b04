"""Network components of MM-Former as plain ``nn.Module``s (no Lightning)."""

from fewshot_seg.models.backbone import ResNetBackbone, build_backbone
from fewshot_seg.models.convert import load_reference_checkpoint, load_reference_module
from fewshot_seg.models.criterion import MaskMatchingCriterion, POSCriterion, semantic_to_targets
from fewshot_seg.models.mask_matching import CrossAlignment, MaskMatching, SelfAlignment
from fewshot_seg.models.matcher import HungarianMatcher
from fewshot_seg.models.pos import PotentialObjectsSegmenter

__all__ = [
    "CrossAlignment",
    "HungarianMatcher",
    "MaskMatching",
    "MaskMatchingCriterion",
    "POSCriterion",
    "PotentialObjectsSegmenter",
    "ResNetBackbone",
    "SelfAlignment",
    "build_backbone",
    "load_reference_checkpoint",
    "load_reference_module",
    "semantic_to_targets",
]
