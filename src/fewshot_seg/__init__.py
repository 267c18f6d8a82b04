"""fewshot_seg: MM-Former (Mask Matching Transformer for few-shot segmentation) in PyTorch Lightning."""

from pathlib import Path

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.segmenter import Segmenter, Supports

__all__ = ["EpisodeBatch", "Segmenter", "Supports", "config_dir"]
__version__ = "0.1.0"


def config_dir() -> Path:
    """The shipped LightningCLI YAMLs: package data, linked as ``lightning_configs/`` in a checkout."""
    return Path(__file__).resolve().with_name("lightning_configs")
