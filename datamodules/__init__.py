"""Few-shot episode LightningDataModules emitting ``fewshot_seg.episode.EpisodeBatch``."""

from .base import EpisodeDataModule
from .binary import BinaryMaskFolderSource, read_threshold_mask
from .coco import Coco20iDataModule, COCOSource, render_semantic
from .coco2pascal import VOC_TO_COCO, Coco2PascalDataModule
from .coco_format import CocoFileSource, CocoFormatDataModule
from .crossdomain import ChestXrayDataModule, DeepglobeDataModule, ISIC2018DataModule
from .errors import DatasetError
from .folder import FolderEpisodeDataModule
from .fss import FSS1000DataModule
from .lvis import LVIS92iDataModule, LVISSource
from .mask_folder import MaskFolderDataModule
from .own_classes import OwnClassesDataModule
from .pascal import PASCAL_CLASSES, Pascal5iDataModule, VOCSource
from .source import SegmentationSource
from .synthetic import SYNTHETIC_CLASSES, SyntheticDataModule, generate_synthetic_voc
from .transforms import TestTransform, TrainAugment, default_support_min_pixels, default_train_scales

__all__ = [
    "PASCAL_CLASSES",
    "SYNTHETIC_CLASSES",
    "VOC_TO_COCO",
    "BinaryMaskFolderSource",
    "COCOSource",
    "ChestXrayDataModule",
    "Coco2PascalDataModule",
    "Coco20iDataModule",
    "CocoFileSource",
    "CocoFormatDataModule",
    "DatasetError",
    "DeepglobeDataModule",
    "EpisodeDataModule",
    "FSS1000DataModule",
    "FolderEpisodeDataModule",
    "ISIC2018DataModule",
    "LVIS92iDataModule",
    "LVISSource",
    "MaskFolderDataModule",
    "OwnClassesDataModule",
    "Pascal5iDataModule",
    "SegmentationSource",
    "SyntheticDataModule",
    "TestTransform",
    "TrainAugment",
    "VOCSource",
    "default_support_min_pixels",
    "default_train_scales",
    "generate_synthetic_voc",
    "read_threshold_mask",
    "render_semantic",
]
