"""Every DataModule's loaders ship uint8 images and labels across the worker boundary; the model's
``on_after_batch_transfer`` makes them float32 / int64 once, on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import GEN
from PIL import Image

from datamodules import (
    ChestXrayDataModule,
    Coco2PascalDataModule,
    Coco20iDataModule,
    DeepglobeDataModule,
    FolderEpisodeDataModule,
    FSS1000DataModule,
    ISIC2018DataModule,
    LVIS92iDataModule,
    Pascal5iDataModule,
    SyntheticDataModule,
)
from datamodules.fake import (
    make_fake_chestxray,
    make_fake_coco,
    make_fake_deepglobe,
    make_fake_fss,
    make_fake_isic,
    make_fake_lvis,
    make_fake_voc,
)
from fewshot_seg.episode import EpisodeBatch, normalize_images

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

LABELS = ("query_mask", "support_masks", "query_semantic")
SIZE = 48


def _folder(root: Path) -> Path:
    for d in ("supports", "queries"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d, name in (("supports", "s"), ("queries", "q")):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / d / f"{name}.jpg")
        mask = np.zeros((40, 60), dtype=np.uint8)
        mask[5:25, 10:40] = 255
        Image.fromarray(mask).save(root / d / f"{name}_mask.png")
    return root


# name -> (DataModule, writes a tiny tree in its on-disk format, its own arguments, trains?)
MODULES: dict[str, tuple[type, Callable[[Path], Path], dict, bool]] = {
    "pascal": (Pascal5iDataModule, lambda p: make_fake_voc(p, per_class=3), {}, True),
    "coco": (Coco20iDataModule, lambda p: make_fake_coco(p, per_class=2), {}, True),
    "fss1000": (FSS1000DataModule, lambda p: make_fake_fss(p, per_class=10), {}, True),
    "lvis92i": (LVIS92iDataModule, make_fake_lvis, {"train_pool_min_pixels": 50}, True),
    "coco2pascal": (Coco2PascalDataModule, lambda p: make_fake_voc(p, per_class=3), {}, False),
    "deepglobe": (DeepglobeDataModule, make_fake_deepglobe, {}, False),
    "isic2018": (ISIC2018DataModule, make_fake_isic, {}, False),
    "chestxray": (ChestXrayDataModule, make_fake_chestxray, {}, False),
    "folder": (FolderEpisodeDataModule, _folder, {}, False),
}


def _loaders(dm, trains: bool) -> dict:
    if isinstance(dm, FolderEpisodeDataModule):
        return {"predict": dm.predict_dataloader}
    loaders = {"val": dm.val_dataloader, "test": dm.test_dataloader}
    return {"train": dm.train_dataloader, **loaders} if trains else loaders


def _check(batch: EpisodeBatch, where: str) -> None:
    for name in ("query_image", "support_images", *LABELS):
        assert getattr(batch, name).dtype == torch.uint8, f"{where}: {name} is {getattr(batch, name).dtype}"
    assert all(t.dtype == torch.uint8 for t in batch.query_label_orig), where
    ready = batch.normalized()  # what EpisodeModule.on_after_batch_transfer hands the model
    assert ready.query_image.dtype == ready.support_images.dtype == torch.float32, where
    assert torch.equal(ready.query_image, normalize_images(batch.query_image)), where
    for name in LABELS:
        assert torch.equal(getattr(ready, name), getattr(batch, name).long()), f"{where}: {name}"
    for a, b in zip(ready.query_label_orig, batch.query_label_orig, strict=True):
        assert torch.equal(a, b.long()), f"{where}: query_label_orig"
    assert ready.normalized().query_image is ready.query_image  # converting twice is a no-op


@pytest.mark.parametrize("name", sorted(MODULES))
def test_loaders_ship_uint8(name: str, tmp_path: Path) -> None:
    cls, make, own, trains = MODULES[name]
    root = make(tmp_path / name)
    kw = {"image_size": SIZE, "batch_size": 2, "num_workers": 1, **own}
    if name != "folder":
        kw |= {"cache_dir": str(tmp_path / "cache"), "val_episodes": 4, "test_episodes": 4}
    dm = cls(root=str(root), **kw)
    for split, loader in _loaders(dm, trains).items():
        _check(next(iter(loader())), f"{name} {split}")  # through a worker process, as in training


def test_synthetic_loaders_ship_uint8(synthetic_root: Path, tmp_path: Path) -> None:
    dm = SyntheticDataModule(
        root=str(synthetic_root), **GEN, pool_min_pixels=50, image_size=SIZE, batch_size=2, num_workers=1,
        test_episodes=4, val_episodes=4, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    for split, loader in _loaders(dm, True).items():
        _check(next(iter(loader())), f"synthetic {split}")
