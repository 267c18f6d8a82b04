"""Bad input gives a DatasetError that names the problem and the path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from datamodules import DatasetError, Pascal5iDataModule
from datamodules.fake import make_fake_voc, write_voc_label


@pytest.fixture
def voc(tmp_path):
    return make_fake_voc(tmp_path / "VOC2012", per_class=2)


def _dm(root, **kw):
    return Pascal5iDataModule(
        root=str(root), image_size=48, num_workers=0, test_episodes=4, val_episodes=4, **kw
    )


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere(.|\n)*JPEGImages"):
        _dm(tmp_path / "nowhere").setup("test")


def test_missing_subfolder(voc):
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(DatasetError, match=r"label folder not found: .*SegmentationClassAug"):
        _dm(voc).setup("test")


def test_image_without_mask(voc):
    (voc / "SegmentationClassAug" / "va_c03_1.png").unlink()
    with pytest.raises(DatasetError, match=r"no label.*va_c03_1"):
        _dm(voc).setup("test")


def test_mask_without_image(voc):
    (voc / "JPEGImages" / "tr_c07_0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"no image.*tr_c07_0"):
        _dm(voc).setup("fit")


def test_corrupt_image(voc):
    (voc / "JPEGImages" / "va_c01_0.jpg").write_bytes(b"this is not a jpeg")
    dm = _dm(voc, shot=1)
    ds = dm.eval_dataset("test")
    bad = next(i for i, (q, _, s) in enumerate(ds.episodes) if "va_c01_0" in (q, *s[:1]))
    with pytest.raises(DatasetError, match=r"cannot read image .*va_c01_0.jpg"):
        ds[bad]


def test_mask_values_out_of_range(voc):
    label = np.zeros((72, 96), dtype=np.uint8)
    label[:10] = 30
    write_voc_label(voc / "SegmentationClassAug" / "va_c02_0.png", label)
    with pytest.raises(DatasetError, match=r"va_c02_0.png holds values \[30\] outside"):
        _dm(voc).setup("test")


def test_fold_and_shot_out_of_range(voc):
    with pytest.raises(DatasetError, match=r"fold must be in 0..3, got 4"):
        _dm(voc, fold=4)
    with pytest.raises(DatasetError, match=r"shot must be in 1..max_shot=5, got 0"):
        _dm(voc, shot=0)


def test_pool_too_small_names_class(voc):
    with pytest.raises(DatasetError, match=r"class pool too small.*class 6 \(bus\): 2 images"):
        _dm(voc, shot=2).setup("fit")
