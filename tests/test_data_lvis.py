"""LVIS-92i on a tiny LVIS v1 tree: Matcher's folds, round-robin episodes, instance-union masks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from datamodules import DatasetError, LVIS92iDataModule
from datamodules.coco import annotation_mask
from datamodules.fake import make_fake_lvis
from fewshot_seg.episode import collate_episodes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def lvis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_lvis(tmp_path_factory.mktemp("lvis"))


def _dm(root: Path, tmp: Path, **kw) -> LVIS92iDataModule:
    kw = {
        "image_size": 48,
        "num_workers": 0,
        "batch_size": 2,
        "val_episodes": 6,
        "train_pool_min_pixels": 50,
        **kw,
    }
    return LVIS92iDataModule(root=str(root), cache_dir=str(tmp / "cache"), **kw)


def _val(root: Path) -> dict:
    return json.loads((root / "annotations" / "lvis_v1_val.json").read_text())


def test_folds_interleave_the_eligible_val_classes(lvis_root: Path, tmp_path: Path) -> None:
    # Categories 1..22 are in 3 val images, 23 in one (not eligible), 24 in none: 22 eligible,
    # 22 // 10 = 2 per fold, fold i = eligible[i], eligible[i + 10]; eligible[20:] are in no fold.
    dm = _dm(lvis_root, tmp_path)
    assert dm.eligible_classes == list(range(1, 23))
    folds = [_dm(lvis_root, tmp_path, fold=f).novel_classes for f in range(10)]
    assert folds == [[f + 1, f + 11] for f in range(10)]
    assert sorted(c for f in folds for c in f) == list(range(1, 21))
    assert dm.num_classes == 24 and dm.class_name(3) == "lvis_thing_03"
    assert dm.base_classes == [c for c in range(1, 25) if c not in (1, 11)]
    with pytest.raises(DatasetError, match=r"fold must be in 0..9, got 10"):
        _dm(lvis_root, tmp_path, fold=10)


def test_round_robin_episodes(lvis_root: Path, tmp_path: Path) -> None:
    dm = _dm(lvis_root, tmp_path, fold=3, shot=5)
    episodes = dm.episode_list("test")
    assert len(episodes) == 2300  # Matcher's count; 1,150 per class with 2 classes per fold
    assert [c for _, c, _ in episodes[:6]] == [4, 14, 4, 14, 4, 14]
    assert Counter(c for _, c, _ in episodes) == {4: 1150, 14: 1150}
    pools = dm.pools("test", dm.novel_classes)
    assert all(len(p) == 3 for p in pools.values())
    for q, c, sup in episodes:
        assert q in pools[c] and q not in sup and all(s in pools[c] for s in sup)
    assert dm.episode_list_file("test").name == "lvis92i_fold3_test_round_robin_n2300_seed0_maxshot5.json"


def test_lists_reproducible_across_runs_and_workers(lvis_root: Path, tmp_path: Path) -> None:
    a = _dm(lvis_root, tmp_path, test_episodes=8, episode_list_dir=str(tmp_path / "a"))
    b = _dm(lvis_root, tmp_path, test_episodes=8, episode_list_dir=str(tmp_path / "b"))
    assert a.episode_list("test") == b.episode_list("test")
    ds = a.eval_dataset("test")
    batches = [
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=n, collate_fn=collate_episodes)))
        for n in (0, 2)
    ]
    assert batches[0].query_id == batches[1].query_id and torch.equal(
        batches[0].query_mask, batches[1].query_mask
    )
    assert batches[0].class_id.tolist() == [1, 11, 1, 11]  # global LVIS category ids


def test_image_paths_come_from_coco_url(lvis_root: Path, tmp_path: Path) -> None:
    src = _dm(lvis_root, tmp_path).source("test")
    in_train = [i for i, (rel, _, _) in src.images.items() if rel.startswith("train2017/")]
    assert in_train and (lvis_root / src.images[in_train[0]][0]).is_file()
    assert src.load_image(in_train[0]).shape == (64, 80, 3)


def test_masks_are_the_union_of_the_class_instances(lvis_root: Path, tmp_path: Path) -> None:
    data = _val(lvis_root)
    special = str(data["images"][-1]["id"])  # category 1: polygon + RLE; category 2 overlaps the polygon
    src = _dm(lvis_root, tmp_path).source("test")
    assert src.label_classes(special) == {1: 1, 2: 2}
    union = {1: np.zeros((64, 80), bool), 2: np.zeros((64, 80), bool)}
    for a in data["annotations"]:
        if str(a["image_id"]) == special:
            union[a["category_id"]] |= annotation_mask(a["segmentation"], 64, 80) > 0
    assert (union[1] & union[2]).any()
    # The episode class is painted last: its mask is its whole instance union, others are background.
    for c in (1, 2):
        label = src.load_class_label(special, c)
        assert np.array_equal(label == src.class_value(special, c), union[c])
    plain = src.load_label(special)  # larger category first, the smaller on top
    assert np.array_equal(plain == 2, union[2]) and not np.array_equal(plain == 1, union[1])
    counts = src.image_class_counts(special)  # from RLE areas, no rendering
    assert counts == {1: int(union[1].sum()), 2: int(union[2].sum())}
    rle = mask_utils.encode(np.asfortranarray(union[1].astype(np.uint8)))
    assert counts[1] == int(mask_utils.area(rle))


def test_test_episodes_use_the_whole_class_mask(lvis_root: Path, tmp_path: Path) -> None:
    dm = _dm(lvis_root, tmp_path, test_episodes=4, image_size=80)
    src, ds = dm.source("test"), dm.eval_dataset("test")
    for i, (q, c, _) in enumerate(ds.episodes):
        s = ds[i]
        label = src.load_class_label(q, c) == src.class_value(q, c)
        assert int(s["class_id"]) == c and set(s["query_mask"].unique().tolist()) <= {0, 1}
        assert int(s["query_mask"].sum()) > 0 and label.any()
        sem = s["query_semantic"]
        assert not (sem == src.class_value(q, c)).any()  # the novel class is 255 in the stage-1 target


def test_training_episodes_avoid_the_fold_classes(lvis_root: Path, tmp_path: Path) -> None:
    dm = _dm(lvis_root, tmp_path, fold=0, shot=1)
    ds = dm.train_dataset()
    assert sorted(ds.pools) == dm.base_classes  # every base category has 3 training images
    for k in range(6):
        s = ds[k]
        assert int(s["class_id"]) in dm.base_classes and s["query_id"] not in s["support_ids"]
        assert (s["query_mask"] == 1).any()
    strict = _dm(lvis_root, tmp_path, fold=0, shot=3)  # 3 images per class cannot give 1 + 3
    with pytest.raises(DatasetError, match=r"no training category has 4 images"):
        strict.train_dataset()


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_fake_lvis(tmp_path / "lvis")
    ann = root / "annotations" / "lvis_v1_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][5]["image_id"] = 424242
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"lvis_v1_val.json: annotation 6 refers to unknown image 424242"):
        _ = _dm(root, tmp_path).novel_classes
    data["annotations"][5]["image_id"] = data["images"][0]["id"]
    del data["images"][0]["coco_url"]
    ann.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"lvis_v1_val.json: image 500000 has neither coco_url nor file_name"
    ):
        _ = _dm(root, tmp_path).novel_classes
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match=r"invalid LVIS annotation file .*lvis_v1_val.json"):
        _ = _dm(root, tmp_path).novel_classes
    ann.unlink()
    with pytest.raises(DatasetError, match=r"annotation file not found: .*lvis_v1_val.json"):
        _ = _dm(root, tmp_path).novel_classes


def _matcher_image(path: Path, size: int) -> np.ndarray:
    """What Matcher's loader feeds the model (``matcher/data/dataset.py``): torchvision ``Resize`` of the
    PIL image read from the file, as ``[3, S, S]`` uint8 (before ``ToTensor``'s division by 255)."""
    from PIL import Image
    from torchvision import transforms

    with Image.open(path) as im:
        resized = transforms.Resize(size=(size, size))(im.convert("RGB"))
    return np.asarray(resized).transpose(2, 0, 1)


def _matcher_mask(union: np.ndarray, size: int) -> np.ndarray:
    """Matcher's mask resize: ``F.interpolate(..., mode='nearest')`` of the instance union."""
    resized = torch.nn.functional.interpolate(torch.from_numpy(union)[None, None].float(), (size, size))
    return resized[0, 0].numpy().astype(np.uint8)


def test_test_images_are_resized_as_matcher_does(lvis_root: Path, tmp_path: Path) -> None:
    dm = _dm(lvis_root, tmp_path, test_episodes=6)  # 64 x 80 images shrunk to 48: antialiasing matters
    assert dm.image_resize == "pil" and dm.provenance()["image_resize"] == "pil"
    src, ds = dm.source("test"), dm.eval_dataset("test")
    anns = _val(lvis_root)["annotations"]
    for i, (q, c, sup) in enumerate(ds.episodes):
        s = ds[i]
        assert np.array_equal(s["query_image"].numpy(), _matcher_image(lvis_root / src.images[q][0], 48))
        assert np.array_equal(
            s["support_images"][0].numpy(), _matcher_image(lvis_root / src.images[sup[0]][0], 48)
        )
        union = np.zeros((64, 80), np.uint8)  # Matcher: the sum of the class's instance masks > 0
        for a in anns:
            if str(a["image_id"]) == q and a["category_id"] == c:
                union |= annotation_mask(a["segmentation"], 64, 80) > 0
        # 64 and 80 -> 48 map to the same source rows in OpenCV's and torch's nearest (docs/benchmarks.md)
        assert np.array_equal(s["query_mask"].numpy(), _matcher_mask(union, 48))
    plain = _dm(lvis_root, tmp_path, test_episodes=6, image_resize="cv2").eval_dataset("test")
    q, _, _ = ds.episodes[0]
    other = plain[0]["query_image"].numpy().astype(int)
    expected = _matcher_image(lvis_root / src.images[q][0], 48).astype(int)
    assert np.abs(other - expected).mean() > 1.0  # the OpenCV resize is still available, and is another input


def _val_images_per_category(root: Path) -> dict[int, int]:
    images: dict[int, set] = {}
    for a in _val(root)["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    return {c: len(ids) for c, ids in sorted(images.items())}


def test_matcher_folds_depend_on_the_shot(tmp_path: Path) -> None:
    # Category 3 is in exactly 3 val images, the other eligible ones in 6: Matcher's 5-shot rule
    # (len(val_anno[c]) > shot) drops 3 and every later class moves back one place in the interleaving.
    root = make_fake_lvis(tmp_path / "lvis", val_images={c: 3 if c == 3 else 6 for c in range(1, 23)})
    per_category = _val_images_per_category(root)
    assert per_category[3] == 3 and per_category[23] == 1

    def matcher_fold(shot: int, fold: int) -> list[int]:
        eligible = [c for c, n in per_category.items() if n > shot]
        return [eligible[fold + 10 * v] for v in range(len(eligible) // 10)]

    def dm(shot: int, fold: int, **kw) -> LVIS92iDataModule:
        return _dm(root, tmp_path, shot=shot, fold=fold, fold_classes_from_shot=True, **kw)

    assert [dm(1, f).novel_classes for f in range(10)] == [[f + 1, f + 11] for f in range(10)]
    five = [dm(5, f).novel_classes for f in range(10)]
    assert five == [matcher_fold(5, f) for f in range(10)]
    assert five[:3] == [[1, 12], [2, 13], [4, 14]] and 3 not in {c for f in five for c in f}
    assert dm(1, 2).novel_classes == [3, 13] and matcher_fold(1, 2) == [3, 13]
    # The default keeps the 1-shot folds at every shot.
    assert _dm(root, tmp_path, shot=5, fold=2).novel_classes == [3, 13]
    # 2,300 episodes round robin over the 5-shot fold, in a list file of its own.
    d = dm(5, 2)
    episodes = d.episode_list("test")
    assert len(episodes) == 2300 and [c for _, c, _ in episodes[:4]] == [4, 14, 4, 14]
    assert Counter(c for _, c, _ in episodes) == {4: 1150, 14: 1150}
    assert all(q not in sup and len(sup) == 5 for q, _, sup in episodes)
    assert (
        d.episode_list_file("test").name
        == "lvis92i_min6images_fold2_test_round_robin_n2300_seed0_maxshot5.json"
    )
    assert dm(1, 2).episode_list_file("test") == _dm(root, tmp_path, fold=2).episode_list_file("test")
    assert d.provenance()["fold_classes_from_shot"] is True
    assert "fold_classes_from_shot" not in _dm(root, tmp_path, shot=5, fold=2).provenance()
    assert 3 in d.base_classes and 4 not in d.base_classes


def test_a_one_shot_fold_model_is_refused_on_matcher_five_shot_folds(tmp_path: Path) -> None:
    from fewshot_seg.checkpoints import CheckpointError
    from fewshot_seg.lightning.provenance import check_class_split, merge_trained_on

    root = make_fake_lvis(tmp_path / "lvis", val_images={c: 3 if c == 3 else 6 for c in range(1, 23)})
    trained = merge_trained_on(
        None, _dm(root, tmp_path, fold=2).provenance()
    )  # trained without 4, 14 ... 3, 13
    five = _dm(root, tmp_path, shot=5, fold=2, fold_classes_from_shot=True).provenance()
    with pytest.raises(CheckpointError, match=r"fold 2"):
        check_class_split(trained, five, "test", allow=False)
