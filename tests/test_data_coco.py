"""COCO-20i DataModule on a tiny COCO-format dataset (JSON with polygon, RLE and crowd)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools.coco import COCO

from datamodules import Coco20iDataModule, DatasetError
from datamodules.coco import COCOSource
from datamodules.fake import COCO_CATEGORY_IDS, make_fake_coco

# pycocotools decode trips a numpy-2 copy-keyword DeprecationWarning; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_fake_coco(tmp_path_factory.mktemp("coco"), year=2014, per_class=2)


@pytest.mark.parametrize("fold", range(4))
def test_fold_classes_match_spec(fold, tmp_path):
    inter = Coco20iDataModule(root=str(tmp_path), fold=fold)
    assert inter.novel_classes == [fold + 1 + 4 * k for k in range(20)]
    assert inter.novel_classes[-1] == fold + 77
    cont = Coco20iDataModule(root=str(tmp_path), fold=fold, split="contiguous")
    assert cont.novel_classes == list(range(20 * fold + 1, 20 * fold + 21))
    for dm in (inter, cont):
        assert dm.base_classes == [c for c in range(1, 81) if c not in dm.novel_classes]


def _reference_label(coco: COCO, image_id: int) -> np.ndarray:
    """SPEC: category rank, crowd skipped, later instances overwrite earlier (pycocotools' own masks)."""
    rank = {cid: i + 1 for i, cid in enumerate(sorted(coco.getCatIds()))}
    info = coco.imgs[image_id]
    label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for ann in coco.imgToAnns[image_id]:
        if ann["iscrowd"]:
            continue
        label[coco.annToMask(ann) > 0] = rank[ann["category_id"]]
    return label


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_equal_pycocotools(coco_root, split):
    coco = COCO(str(coco_root / "annotations" / f"instances_{split}2014.json"))
    src = COCOSource(coco_root, split, 2014)
    special = max(coco.imgs)  # the image with RLE / overlapping RLE / crowd annotations
    for image_id in [*sorted(coco.imgs)[:3], special]:
        assert np.array_equal(src.load_label(str(image_id)), _reference_label(coco, image_id))
    label = src.load_label(str(special))
    # Overlap of the first (rank 6) and second (rank 71) instance belongs to the later one.
    assert label[60, 60] == 71 and label[20, 20] == 6
    # The crowd region (rows 0..39, cols 80..127) stays background where nothing else lies.
    assert label[5, 120] == 0
    ignore = COCOSource(coco_root, split, 2014, crowd="ignore").load_label(str(special))
    assert ignore[5, 120] == 255
    assert COCO_CATEGORY_IDS[70] != 71  # ranks, not raw ids, are the class indices


def test_episodes(coco_root, tmp_path):
    dm = Coco20iDataModule(
        root=str(coco_root), fold=1, shot=1, image_size=64, num_workers=0, test_episodes=10, val_episodes=4,
        cache_dir=str(tmp_path / "cache"), batch_size=2,
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert all(int(c) in dm.base_classes for c in batch.class_id)
    assert not any((batch.query_semantic == n).any() for n in dm.novel_classes)
    episodes = dm.episode_list("test")
    assert len(episodes) == 10 and all(c in dm.novel_classes for _, c, _ in episodes)
    test = next(iter(dm.test_dataloader()))
    assert test.query_image.shape == (2, 3, 64, 64) and test.original_sizes[0] == (128, 128)


def test_bad_json(tmp_path, coco_root):
    with pytest.raises(DatasetError, match=r"annotation file not found.*instances_train2017.json"):
        COCOSource(coco_root, "train", 2017)
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "train2014").mkdir()
    (bad / "annotations" / "instances_train2014.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"invalid COCO annotation file .*instances_train2014.json"):
        COCOSource(bad, "train", 2014)
    (bad / "annotations" / "instances_train2014.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"missing keys.*annotations"):
        COCOSource(bad, "train", 2014)
    with pytest.raises(DatasetError, match="dataset root not found"):
        COCOSource(tmp_path / "nowhere", "train", 2014)
