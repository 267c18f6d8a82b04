"""fewshot_seg: MM-Former (Mask Matching Transformer for few-shot segmentation) in PyTorch Lightning."""

from fewshot_seg.episode import EpisodeBatch

__all__ = ["EpisodeBatch"]
__version__ = "0.1.0"
