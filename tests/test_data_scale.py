"""The data path at scale: parallel class-count scan, packed (shared, cached) COCO index, fast transforms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import source as source_module
from datamodules.coco import COCOSource
from datamodules.fake import make_fake_coco, make_fake_voc
from datamodules.packed import PackedList
from datamodules.pascal import VOCSource
from datamodules.transforms import normalize_image
from fewshot_seg.episode import PIXEL_MEAN, PIXEL_STD

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2


def test_parallel_scan_equals_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = VOCSource(make_fake_voc(tmp_path / "voc", per_class=2), "train")
    serial = src._scan("serial")
    monkeypatch.setattr(source_module, "SCAN_CHUNK", 4)  # 40 images: forked workers take 4 at a time
    assert source_module.scan_workers(len(src.ids)) == min(len(os.sched_getaffinity(0)), 16)
    parallel = src._scan("parallel")
    assert parallel == serial and list(parallel) == src.ids


def test_packed_list_round_trip(tmp_path: Path) -> None:
    items = [("a.jpg", 3, 4, [(1, 0, [[0.0, 1.0, 2.0]])]), ("b.jpg", 5, 6, []), {"x": np.arange(3).tolist()}]
    packed = PackedList.from_items(items)
    assert [packed[i] for i in range(len(packed))] == items
    packed.save(tmp_path / "p")
    loaded = PackedList.load(tmp_path / "p")
    assert isinstance(loaded.buffer, np.memmap) and [loaded[i] for i in range(3)] == items


def test_coco_index_cached_and_invalidated(tmp_path: Path) -> None:
    root = make_fake_coco(tmp_path / "coco", per_class=1)
    plain = COCOSource(root, "val", 2014)
    first = COCOSource(root, "val", 2014, cache_dir=tmp_path / "cache")
    cached = COCOSource(root, "val", 2014, cache_dir=tmp_path / "cache")
    assert isinstance(cached.records.buffer, np.memmap)  # mapped, not parsed
    assert plain.ids == first.ids == cached.ids and plain.class_names == cached.class_names
    for image_id in plain.ids:
        assert np.array_equal(plain.load_label(image_id), cached.load_label(image_id))
    # A changed JSON is parsed again.
    ann = root / "annotations" / "instances_val2014.json"
    ann.write_text(ann.read_text().replace('"iscrowd": 1', '"iscrowd": 0'))
    rebuilt = COCOSource(root, "val", 2014, cache_dir=tmp_path / "cache")
    assert not isinstance(rebuilt.records.buffer, np.memmap)
    with pytest.raises(KeyError, match="lists no image 12345"):
        rebuilt.record("12345")


def test_normalize_image_is_exact() -> None:
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    mean, std = np.asarray(PIXEL_MEAN, np.float32), np.asarray(PIXEL_STD, np.float32)
    expected = torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())
    assert torch.equal(normalize_image(image), expected)  # the table lookup is bit-identical
