"""Few-shot episode LightningDataModules emitting ``fewshot_seg.episode.EpisodeBatch``."""

from .base import EpisodeDataModule
from .coco import Coco20iDataModule, COCOSource, render_semantic
from .errors import DatasetError
from .folder import FolderEpisodeDataModule
from .pascal import PASCAL_CLASSES, Pascal5iDataModule, VOCSource
from .source import SegmentationSource
from .synthetic import SYNTHETIC_CLASSES, SyntheticDataModule, generate_synthetic_voc
from .transforms import TestTransform, TrainAugment, default_support_min_pixels, default_train_scales

__all__ = [
    "PASCAL_CLASSES",
    "SYNTHETIC_CLASSES",
    "COCOSource",
    "Coco20iDataModule",
    "DatasetError",
    "EpisodeDataModule",
    "FolderEpisodeDataModule",
    "Pascal5iDataModule",
    "SegmentationSource",
    "SyntheticDataModule",
    "TestTransform",
    "TrainAugment",
    "VOCSource",
    "default_support_min_pixels",
    "default_train_scales",
    "generate_synthetic_voc",
    "render_semantic",
]
