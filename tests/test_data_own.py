"""A user's own data: COCO-format JSON and class-index mask folders, with the user's class split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import GEN

from datamodules import (
    SYNTHETIC_CLASSES,
    CocoFormatDataModule,
    DatasetError,
    MaskFolderDataModule,
    SyntheticDataModule,
)
from datamodules.export import category_id, voc_to_coco_format, voc_to_mask_folder
from datamodules.fake import MASK_FOLDER_CLASSES, OWN_CLASSES, make_fake_coco_format, make_fake_mask_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

SMALL = {"image_size": 48, "num_workers": 0, "pool_min_pixels": 100, "test_episodes": 8, "val_episodes": 4}


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_fake_coco_format(tmp_path / "export")


@pytest.fixture
def masks(tmp_path: Path) -> Path:
    return make_fake_mask_folder(tmp_path / "masks")


def _coco(root: Path, **kw) -> CocoFormatDataModule:
    return CocoFormatDataModule(root=str(root), **{**SMALL, **kw})


def _masks(root: Path, **kw) -> MaskFolderDataModule:
    return MaskFolderDataModule(root=str(root), **{**SMALL, **kw})


def _train_episodes(dm, n: int = 12) -> list[dict]:
    dm.setup("fit")
    return [dm._train[k] for k in range(n)]


def _novel_values(sample: dict) -> set[int]:
    return set(sample["query_semantic"].unique().tolist())


@pytest.mark.parametrize("novel", [["rust"], [300], ["300"]])
def test_coco_novel_classes_by_name_or_id(coco: Path, novel: list) -> None:
    dm = _coco(coco, novel_classes=novel)
    # Categories 3, 17, 42, 300 are labels 1..4 in id order; the names are kept.
    assert dm.class_names == ("scratch", "dent", "crack", "rust") and dm.num_classes == 4
    assert dm.novel_classes == [4] and dm.base_classes == [1, 2, 3]
    assert dm.provenance()["class_ids"] == {"1": 3, "2": 17, "3": 42, "4": 300}


def test_coco_folds_deal_categories_by_id(coco: Path) -> None:
    dm = _coco(coco, fold=1, num_folds=2)
    assert [dm.class_name(c) for c in dm.novel_classes] == ["dent", "rust"]  # ids 17 and 300
    assert dm.name == "coco_format_instances_default"


def test_one_json_splits_images_by_novel_class(coco: Path) -> None:
    dm = _coco(coco, novel_classes=["rust"])
    data = json.loads((coco / "annotations" / "instances_default.json").read_text())
    with_rust = {str(a["image_id"]) for a in data["annotations"] if a["category_id"] == 300}
    train, test = dm.source("train"), dm.source("test")
    assert (
        set(test.ids) == with_rust and set(train.ids) == {str(im["id"]) for im in data["images"]} - with_rust
    )
    # No training episode has a novel class, or a novel pixel; every test episode is of a novel class.
    for sample in _train_episodes(dm):
        assert sample["class_id"] in dm.base_classes and 4 not in _novel_values(sample)
        assert set(sample["support_ids"]) | {sample["query_id"]} <= set(train.ids)
    dm.setup("test")
    assert {c for _, c, _ in dm._test.episodes} == {4}
    assert {i for q, _, s in dm._test.episodes for i in (q, *s)} <= with_rust
    assert "with an annotation of a novel class" in dm.provenance()["images"]["test"]


def test_polygon_and_rle_annotations_are_rendered(coco: Path) -> None:
    dm = _coco(coco, novel_classes=["rust"])
    src = dm.source("train")
    data = json.loads((coco / "annotations" / "instances_default.json").read_text())
    kinds = {type(a["segmentation"]).__name__ + str(isinstance(a["segmentation"], dict) and
             isinstance(a["segmentation"]["counts"], list)) for a in data["annotations"]}  # fmt: skip
    assert kinds == {"listFalse", "dictFalse", "dictTrue"}  # polygon, compressed and uncompressed RLE
    for image_id in src.ids:  # the two boxes of make_fake_coco_format, top then bottom, in label order
        expected = np.zeros((48, 64), dtype=np.uint8)
        anns = [a for a in data["annotations"] if str(a["image_id"]) == image_id]
        for y0, a in zip((2, 26), anns, strict=True):
            expected[y0 : y0 + 20, 2:62] = sorted(OWN_CLASSES).index(a["category_id"]) + 1
        np.testing.assert_array_equal(src.load_label(image_id), expected)


def test_two_jsons_train_on_one_and_test_on_the_other(coco: Path, tmp_path: Path) -> None:
    data = json.loads((coco / "annotations" / "instances_default.json").read_text())
    half = {im["id"] for im in data["images"][::2]}
    for name, keep in (("train", lambda i: i not in half), ("test", lambda i: i in half)):
        part = {
            **data,
            "images": [im for im in data["images"] if keep(im["id"])],
            "annotations": [a for a in data["annotations"] if keep(a["image_id"])],
        }
        (coco / "annotations" / f"{name}.json").write_text(json.dumps(part))
    dm = _coco(coco, annotations="annotations/train.json", test_annotations="annotations/test.json",
               novel_classes=["crack"])  # fmt: skip
    assert set(dm.source("test").ids) == {str(i) for i in half}
    assert not set(dm.source("train").ids) & set(dm.source("test").ids)
    for sample in _train_episodes(dm):  # training images may show a crack, ignored (255) as in COCO-20i
        assert sample["class_id"] != 3 and 3 not in _novel_values(sample)


def test_mask_folder_classes_txt_and_split_by_novel_class(masks: Path) -> None:
    dm = _masks(masks, novel_classes=["vessel"])
    assert dm.class_names == MASK_FOLDER_CLASSES  # the "background" line is class 0
    assert dm.novel_classes == [4] and dm.name.startswith("mask_folder_masks_novel-")
    train, test = dm.source("train"), dm.source("test")
    holds = {i: set(np.unique(train.load_label(i)).tolist()) for i in train.ids}
    assert all(4 not in v for v in holds.values())
    assert all(4 in np.unique(test.load_label(i)) for i in test.ids)
    assert len(train.ids) + len(test.ids) == 16
    for sample in _train_episodes(dm):
        assert sample["class_id"] in (1, 2, 3) and 4 not in _novel_values(sample)
    dm.setup("test")
    assert {c for _, c, _ in dm._test.episodes} == {4}


def test_mask_folder_split_files(masks: Path) -> None:
    (masks / "splits").mkdir()
    names = [f"s_{k:03d}" for k in range(16)]
    (masks / "splits" / "train.txt").write_text("\n".join(names[:10]) + "\n")
    (masks / "splits" / "test.txt").write_text("\n".join(f"{n}.png" for n in names[10:14]) + "\n")
    (masks / "splits" / "val.txt").write_text("\n".join(names[14:]) + "\n")
    dm = _masks(masks, novel_classes=[4])  # by mask value
    assert dm.source("train").ids == names[:10] and dm.source("test").ids == names[10:14]
    assert dm.eval_images("val") == "val" and dm.source("val").ids == names[14:]
    for sample in _train_episodes(dm):  # training images may show a vessel, ignored (255)
        assert sample["class_id"] != 4 and 4 not in _novel_values(sample)
    dm.setup("validate")
    assert {i for q, _, s in dm._val.episodes for i in (q, *s)} <= set(names[14:])


def _same_episode(a: dict, b: dict) -> None:
    for key in ("query_image", "query_mask", "support_images", "support_masks", "query_semantic",
                "query_label_orig", "query_valid_size"):  # fmt: skip
        assert torch.equal(a[key], b[key]), key
    assert a["class_id"] == b["class_id"]


def test_synthetic_set_through_both_doors_gives_the_same_episodes(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The synthetic set exported as COCO JSON and as a mask folder: the same episodes, pixel for pixel."""
    small = {"image_size": 64, "num_workers": 0, "pool_min_pixels": 50, "test_episodes": 6, "val_episodes": 4,
             "shot": 2}  # fmt: skip
    synthetic = SyntheticDataModule(root=str(synthetic_root), **GEN, **small)
    novel = [SYNTHETIC_CLASSES[c - 1] for c in synthetic.novel_classes]
    paths = voc_to_coco_format(synthetic_root, tmp_path / "coco", SYNTHETIC_CLASSES)
    coco = CocoFormatDataModule(
        root=str(tmp_path / "coco"), annotations=str(paths["train"]), test_annotations=str(paths["test"]),
        images=str(synthetic_root / "JPEGImages"), novel_classes=novel, crowd="ignore", **small,
    )  # fmt: skip
    folder = MaskFolderDataModule(
        root=str(voc_to_mask_folder(synthetic_root, tmp_path / "masks", SYNTHETIC_CLASSES)),
        novel_classes=novel,
        **small,
    )
    assert coco.provenance()["class_ids"]["1"] == category_id(1) != 1
    for dm in (synthetic, coco, folder):
        dm.trainer = None
        dm.setup()
    assert coco.novel_classes == folder.novel_classes == synthetic.novel_classes
    for k in range(0, 40, 3):
        ref = synthetic._train[k]
        _same_episode(coco._train[k], ref)
        _same_episode(folder._train[k], ref)
        assert folder._train[k]["query_id"] == ref["query_id"]
    assert len(coco._test) == len(synthetic._test) == 6
    for k in range(6):
        _same_episode(coco._test[k], synthetic._test[k])
        _same_episode(folder._test[k], synthetic._test[k])


# ---- bad input: one line naming the file and the entry ------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_novel_class_suggests_one(coco: Path, masks: Path) -> None:
    with pytest.raises(DatasetError) as err:
        _ = _coco(coco, novel_classes=["rusty"]).novel_classes
    msg = _one_line(err)
    assert "novel_classes: 'rusty' is not a class of" in msg and "instances_default.json" in msg
    assert "did you mean 'rust'?" in msg
    with pytest.raises(
        DatasetError, match=r"'nucleos' is not a class of .*classes.txt \(did you mean 'nucleus'"
    ):
        _ = _masks(masks, novel_classes=["nucleos"]).novel_classes


def test_class_with_too_few_images_is_named(coco: Path) -> None:
    dm = _coco(coco, novel_classes=["rust"], shot=5)  # 'scratch' and 'crack' are in 4 training images each
    dm.trainer = None
    with pytest.raises(DatasetError) as err:
        dm.train_pools()
    msg = _one_line(err)
    assert "instances_default.json" in msg and "class pool too small for 5-shot" in msg
    assert "class 1 (scratch): 4 images" in msg and "class 3 (crack): 4 images" in msg


def test_missing_image_is_named_or_skipped(coco: Path) -> None:
    (coco / "images" / "img_004.jpg").unlink()  # image id 45, a training image (scratch, dent)
    with pytest.raises(DatasetError) as err:
        _coco(coco, novel_classes=["rust"]).source("train")
    assert "image '45' is missing:" in _one_line(err) and "img_004.jpg not found" in str(err.value)
    with pytest.warns(UserWarning, match=r"1 listed image\(s\) missing, left out: .*img_004.jpg"):
        dm = _coco(coco, novel_classes=["rust"], missing_images="skip")
        ids = dm.source("train").ids
    assert "45" not in ids and len(ids) == 7
    assert all(s["query_id"] != "45" for s in _train_episodes(dm))


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: d["annotations"][3].update(category_id=99), r"annotation 4 has unknown category 99"),
        (lambda d: d["images"].append(dict(d["images"][2])), r"image id 25 is listed twice in 'images'"),
        (lambda d: d["annotations"][5].update(segmentation=[]), r"annotation 6 has an empty 'segmentation'"),
        (lambda d: d["categories"].append(dict(d["categories"][1])), r"category id 17 is listed twice"),
        (lambda d: d["categories"][1].update(name="scratch"), r"classes 3 and 17 are both named 'scratch'"),
    ],
)
def test_malformed_entries_are_named(coco: Path, break_it, message: str) -> None:
    ann = coco / "annotations" / "instances_default.json"
    data = json.loads(ann.read_text())
    break_it(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"^{ann}: {message}") as err:
        _ = _coco(coco, novel_classes=["rust"]).novel_classes
    _one_line(err)


def test_mask_folder_bad_input_is_named(masks: Path) -> None:
    (masks / "splits").mkdir()
    (masks / "splits" / "train.txt").write_text("s_000\ns_001\ns_099\n")
    (masks / "splits" / "test.txt").write_text("s_002\n")
    with pytest.raises(
        DatasetError, match=r"train.txt: image 's_099' is missing: .*images/s_099.<ext> not found"
    ):
        _masks(masks, novel_classes=["vessel"]).source("train")
    (masks / "splits" / "test.txt").write_text("s_002\ns_001\n")
    with pytest.raises(
        DatasetError, match=r"test.txt: image 's_001' is listed again \(already in .*train.txt\)"
    ):
        _masks(masks, novel_classes=["vessel"]).source("train")
    (masks / "splits" / "test.txt").write_text("s_002\n")
    label = np.zeros((48, 64), dtype=np.uint8)
    label[:4] = 7
    from PIL import Image

    Image.fromarray(label, mode="L").save(masks / "masks" / "s_000.png")
    dm = _masks(masks, novel_classes=["vessel"], missing_images="skip")
    with (
        pytest.warns(UserWarning, match="s_099"),
        pytest.raises(DatasetError, match=r"s_000.png holds values \[7\]"),
    ):
        dm.source("train").load_label("s_000")
