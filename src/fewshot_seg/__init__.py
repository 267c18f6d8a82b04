"""fewshot_seg: MM-Former (Mask Matching Transformer for few-shot segmentation) in PyTorch Lightning."""

from pathlib import Path

from fewshot_seg.episode import EpisodeBatch

__all__ = ["EpisodeBatch", "Segmenter", "config_dir"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Segmenter imports the data layer, which imports this package: resolved on first use.
    if name in ("Segmenter", "Supports"):
        from fewshot_seg import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'fewshot_seg' has no attribute {name!r}")


def config_dir() -> Path:
    """The shipped LightningCLI YAMLs: package data, linked as ``lightning_configs/`` in a checkout."""
    return Path(__file__).resolve().with_name("lightning_configs")
