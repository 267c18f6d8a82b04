"""COCO-20i -> Pascal-5i transfer: the class table, the test-only DataModule and the name-based overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules import PASCAL_CLASSES, VOC_TO_COCO, Coco2PascalDataModule, DatasetError
from datamodules.coco2pascal import coco_fold_of
from datamodules.fake import COCO_CATEGORY_NAMES, make_fake_voc
from fewshot_seg.lightning.provenance import class_overlap

# Standard VOC ids of the Pascal classes novel to a COCO-20i fold (interleaved split).
EXPECTED = {
    0: [1, 4, 9, 11, 12, 15],  # aeroplane boat chair diningtable dog person
    1: [2, 6, 13, 18],  # bicycle bus horse sofa
    2: [3, 7, 16, 17, 19, 20],  # bird car pottedplant sheep train tvmonitor
    3: [5, 8, 10, 14],  # bottle cat cow motorbike
}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_voc(tmp_path_factory.mktemp("voc") / "VOC2012", per_class=3)


def _dm(root: Path, tmp: Path, fold: int, **kw) -> Coco2PascalDataModule:
    kw = {"image_size": 48, "num_workers": 0, "batch_size": 2, "test_episodes": 20, "val_episodes": 4, **kw}
    return Coco2PascalDataModule(root=str(root), fold=fold, cache_dir=str(tmp / "cache"), **kw)


def test_class_table() -> None:
    assert [v.voc_id for v in VOC_TO_COCO] == list(range(1, 21))
    assert tuple(v.voc_name for v in VOC_TO_COCO) == PASCAL_CLASSES
    for v in VOC_TO_COCO:  # the COCO-20i index is the rank of the category: its name in COCO's list
        assert COCO_CATEGORY_NAMES[v.coco_index - 1] == v.coco_name
        assert v.coco_index in range(coco_fold_of(v.coco_index) + 1, 81, 4)  # novel in that fold
    # car is VOC 7 (COCO fold 2) and cat VOC 8 (COCO fold 3); RePRI's table swaps the two ids.
    assert coco_fold_of(VOC_TO_COCO[6].coco_index) == 2 and VOC_TO_COCO[6].voc_name == "car"
    assert coco_fold_of(VOC_TO_COCO[7].coco_index) == 3 and VOC_TO_COCO[7].voc_name == "cat"


@pytest.mark.parametrize("fold", range(4))
def test_fold_classes(fold: int, tmp_path: Path) -> None:
    dm = Coco2PascalDataModule(root=str(tmp_path), fold=fold)
    assert dm.novel_classes == EXPECTED[fold] and dm.base_classes == []
    assert len(dm.novel_classes) == (6, 4, 6, 4)[fold]


def test_test_episodes_only_on_the_fold_classes(voc_root: Path, tmp_path: Path) -> None:
    dm = _dm(voc_root, tmp_path, fold=2, shot=2)
    episodes = dm.episode_list("test")
    assert len(episodes) == 20 and {c for _, c, _ in episodes} <= set(EXPECTED[2])
    assert all(
        q.startswith("va_") and q not in sup and len(set(sup)) == len(sup) == 2 for q, _, sup in episodes
    )
    assert dm.episode_list("test") == _dm(voc_root, tmp_path, fold=2, shot=2).episode_list("test")
    sample = dm.eval_dataset("test")[0]
    assert int(sample["class_id"]) in EXPECTED[2]
    with pytest.raises(DatasetError, match=r"coco2pascal is test-only"):
        dm.train_dataloader()
    prov = dm.provenance()
    assert prov["dataset"] == "coco2pascal" and prov["novel_classes"] == EXPECTED[2]
    assert prov["class_names"]["20"] == "tv" and prov["class_names"]["16"] == "potted plant"


def _coco_model(fold: int) -> dict:
    """The ``trained_on`` record of a COCO-20i fold-``fold`` model (its base classes, COCO names)."""
    base = [c for c in range(1, 81) if (c - 1) % 4 != fold]
    return {
        "dataset": "coco20i2014_interleaved_skip",
        "fold": fold,
        "classes": base,
        "class_names": {str(c): COCO_CATEGORY_NAMES[c - 1] for c in base},
    }


@pytest.mark.parametrize("fold", range(4))
def test_overlap_by_name_with_a_coco_model(fold: int, tmp_path: Path) -> None:
    data = Coco2PascalDataModule(root=str(tmp_path), fold=fold).provenance()
    assert class_overlap(_coco_model(fold), data)["overlap_classes"] == []  # the matching fold: none
    other = (fold + 1) % 4
    report = class_overlap(_coco_model(other), data)  # another fold's model saw these classes
    assert report["overlap_classes"] == EXPECTED[fold]
