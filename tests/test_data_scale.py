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
from fewshot_seg.episode import PIXEL_MEAN, PIXEL_STD, image_tensor, normalize_images

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


def test_uint8_images_normalised_on_the_device_as_before() -> None:
    """Loaders ship uint8 CHW; the model normalises on its device: the inputs equal the float32 table the
    workers used before, (v - mean) / std per channel (within 1e-6; bit-identical on the CPU)."""
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    table = (np.arange(256, dtype=np.float32)[None, :] - np.asarray(PIXEL_MEAN, np.float32)[:, None]) / (
        np.asarray(PIXEL_STD, np.float32)[:, None]
    )
    before = torch.from_numpy(np.stack([table[c][image[..., c]] for c in range(3)]))
    shipped = image_tensor(image)
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 7, 5)
    after = normalize_images(shipped)
    assert (after - before).abs().max() <= 1e-6 and torch.equal(after, before)


def test_support_draw_equals_the_draw_over_the_pool_without_the_query() -> None:
    from datamodules.episodes import _draw_except

    pool = [str(i) for i in range(0, 300, 3)]
    for exclude in ("0", "150", "297", "not in the pool"):
        for seed in range(20):
            expected_pool = [i for i in pool if i != exclude]
            expected = [
                expected_pool[int(j)]
                for j in np.random.default_rng(seed).choice(len(expected_pool), 5, False)
            ]
            assert _draw_except(pool, exclude, 5, np.random.default_rng(seed)) == expected
