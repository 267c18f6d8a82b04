"""The data layer's input error: defined in ``fewshot_seg.errors`` (the inference path raises it without
importing ``datamodules``), imported here so that every DataModule keeps ``from .errors import ...``."""

from fewshot_seg.errors import DatasetError, reading

__all__ = ["DatasetError", "reading"]
