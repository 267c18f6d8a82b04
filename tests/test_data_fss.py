"""FSS-1000 on a tiny tree in the published layout: HSNet's split files, masks and test protocol."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DatasetError, FSS1000DataModule
from datamodules.fake import FSS_CLASS_NAMES, make_fake_fss
from fewshot_seg.episode import collate_episodes

PER_CLASS = 10  # as FSS-1000: file-name order is 1, 10, 2, ..., 9


@pytest.fixture(scope="module")
def fss_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_fss(tmp_path_factory.mktemp("fss") / "FSS-1000", per_class=PER_CLASS)


def _dm(root: Path, tmp: Path, **kw) -> FSS1000DataModule:
    kw = {"image_size": 48, "num_workers": 0, "batch_size": 2, "val_episodes": 6, **kw}
    return FSS1000DataModule(root=str(root), cache_dir=str(tmp / "cache"), **kw)


def test_class_split_from_files(fss_root: Path, tmp_path: Path) -> None:
    dm = _dm(fss_root, tmp_path)
    train, val, test = (sorted(FSS_CLASS_NAMES[s]) for s in ("train", "val", "test"))
    # Ids: train, then val, then test classes, each sorted by name (HSNet numbers its splits so).
    assert dm.class_names == (*train, *val, *test) and dm.num_classes == 10
    assert dm.base_classes == [1, 2, 3, 4, 5] and dm.novel_classes == [8, 9, 10]
    assert [dm.class_name(c) for c in dm.novel_classes] == test
    prov = dm.provenance()
    assert prov["dataset"] == "fss1000" and prov["base_classes"] == [1, 2, 3, 4, 5]
    assert prov["class_names"]["8"] == "bloodhound" and prov["protocol"] == "hsnet_fss"


def test_hsnet_split_file_names_and_split_dir(tmp_path: Path) -> None:
    root = make_fake_fss(tmp_path / "hs", per_class=3, hsnet_split_names=True)
    assert _dm(root, tmp_path).base_classes == [1, 2, 3, 4, 5]  # trn.txt
    moved = tmp_path / "my_splits"
    shutil.move(root / "splits", moved)
    (moved / "val.txt").unlink()  # optional
    dm = _dm(root, tmp_path, split_dir=str(moved))
    assert dm.novel_classes == [6, 7, 8] and dm.num_classes == 8


def test_test_list_every_image_once_in_hsnet_order(fss_root: Path, tmp_path: Path) -> None:
    dm = _dm(fss_root, tmp_path, shot=5)
    episodes = dm.episode_list("test")
    order = [f"{c}/{n}" for c in sorted(FSS_CLASS_NAMES["test"]) for n in sorted(map(str, range(1, 11)))]
    assert [q for q, _, _ in episodes] == order and len(episodes) == 30
    assert dm.episode_list_file("test").name == "fss1000_fold0_test_hsnet_fss_n30_seed0_maxshot5.json"
    repeats = 0
    for q, c, sup in episodes:
        folder = q.split("/")[0]
        assert c == dm.class_ids[folder] and len(sup) == 5
        assert q not in sup and all(s.split("/")[0] == folder for s in sup)  # same class, never the query
        repeats += len(sup) - len(set(sup))
    assert repeats > 0  # supports are drawn with replacement, as HSNet's


def test_fixed_episode_count_draws_queries_uniformly(fss_root: Path, tmp_path: Path) -> None:
    dm = _dm(fss_root, tmp_path, test_episodes=200)
    episodes = dm.episode_list("test")
    assert len(episodes) == 200
    per_class = Counter(c for _, c, _ in episodes)
    assert set(per_class) == {8, 9, 10} and min(per_class.values()) > 40
    assert all(q not in sup for q, _, sup in episodes)


def test_lists_reproducible_across_runs_and_workers(fss_root: Path, tmp_path: Path) -> None:
    a = _dm(fss_root, tmp_path, episode_list_dir=str(tmp_path / "a"))
    b = _dm(fss_root, tmp_path, episode_list_dir=str(tmp_path / "b"))
    assert a.episode_list("test") == b.episode_list("test") and a.episode_list("val") == b.episode_list("val")
    assert _dm(fss_root, tmp_path, test_seed=5).episode_list("test") != a.episode_list("test")
    ds = a.eval_dataset("test")
    batches = [
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=n, collate_fn=collate_episodes)))
        for n in (0, 2)
    ]
    assert batches[0].query_id == batches[1].query_id and batches[0].support_ids == batches[1].support_ids
    assert torch.equal(batches[0].query_mask, batches[1].query_mask)
    assert torch.equal(batches[0].class_id, torch.tensor([8, 8, 8, 8]))


def test_masks_thresholded_at_128_and_scored_at_squares(fss_root: Path, tmp_path: Path) -> None:
    dm = _dm(fss_root, tmp_path)
    src = dm.source("test")
    grey = np.asarray(Image.open(fss_root / "hotel_slipper" / "3.png").convert("L"))
    assert {100, 200} <= set(np.unique(grey).tolist())  # soft edges on both sides of the threshold
    label = src.load_label("hotel_slipper/3")
    assert np.array_equal(label, (grey >= 128).astype(np.uint8))
    assert src.label_classes("hotel_slipper/3") == {1: dm.class_ids["hotel_slipper"]}
    sample = dm.eval_dataset("test")[0]
    assert set(sample["query_mask"].unique().tolist()) <= {0, 1} and sample["class_id"] == 8
    assert tuple(sample["query_label_orig"].shape) == (48, 48)  # square protocol: scored at image_size
    assert set(sample["query_semantic"].unique().tolist()) <= {0, 255}  # the novel class is ignored


def test_empty_masks_count_as_class_members(fss_root: Path, tmp_path: Path) -> None:
    # The last image of the first test class (bloodhound, by file order) has an empty mask.
    dm = _dm(fss_root, tmp_path)
    assert dm.class_counts("test")["bloodhound/10"] == {8: 0}
    assert "bloodhound/10" in dm.pools("test", [8])[8]  # pool_min_pixels=0: the folder listing
    strict = _dm(fss_root, tmp_path, pool_min_pixels=1, episode_list_dir=str(tmp_path / "strict"))
    assert "bloodhound/10" not in strict.pools("test", [8])[8]
    assert len(strict.episode_list("test")) == 29


def test_training_episodes_on_train_classes(fss_root: Path, tmp_path: Path) -> None:
    dm = _dm(fss_root, tmp_path, shot=2)
    ds = dm.train_dataset()
    assert len(ds) == 5 * PER_CLASS
    for k in range(6):
        s = ds[k]
        c, folder = int(s["class_id"]), s["query_id"].split("/")[0]
        assert c in dm.base_classes and c == dm.class_ids[folder]
        assert s["query_id"] not in s["support_ids"] and all(
            i.startswith(folder + "/") for i in s["support_ids"]
        )
        assert set(s["query_semantic"].unique().tolist()) <= {0, 1, 255}  # image-local values
        assert (s["query_mask"] == 1).any() and (s["support_masks"] == 1).any()
    assert ds[3]["query_id"] == _dm(fss_root, tmp_path, shot=2).train_dataset()[3]["query_id"]


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_fake_fss(tmp_path / "f", per_class=3)
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        _ = _dm(tmp_path / "nowhere", tmp_path).novel_classes
    (root / "splits" / "test.txt").rename(root / "splits" / "test.bak")
    with pytest.raises(DatasetError, match=r"test split file not found: .*splits/test.txt"):
        _ = _dm(root, tmp_path).novel_classes
    (root / "splits" / "test.bak").write_text("bloodhound\nno_such_class\n")
    (root / "splits" / "test.bak").rename(root / "splits" / "test.txt")
    with pytest.raises(DatasetError, match=r"'no_such_class' of .*test.txt has no folder: .*no_such_class/"):
        _ = _dm(root, tmp_path).novel_classes
    (root / "splits" / "test.txt").write_text("bloodhound\nbus\n")
    with pytest.raises(DatasetError, match=r"'bus' is listed in .*train.txt and again in .*test.txt"):
        _ = _dm(root, tmp_path).novel_classes
    (root / "splits" / "test.txt").write_text("bloodhound\nhotel_slipper\n")
    (root / "bloodhound" / "2.png").unlink()
    with pytest.raises(
        DatasetError, match=r"image .*bloodhound/2.jpg has no mask: expected .*bloodhound/2.png"
    ):
        _dm(root, tmp_path).setup("test")
    shutil.copy(root / "bloodhound" / "1.png", root / "bloodhound" / "2.png")
    (root / "hotel_slipper" / "1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"mask .*hotel_slipper/1.png has no image: expected .*1.jpg"):
        _dm(root, tmp_path).setup("test")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("palette", r"mask .*bus/1.png is a palette PNG"),
        ("zero_one", r"mask .*bus/1.png holds only the values 0 and 1"),
        ("colour", r"mask .*bus/1.png is a colour label \(pixel"),
        ("16bit", r"mask .*bus/1.png has mode I;16"),
    ],
)
def test_unexpected_mask_formats_are_refused(tmp_path: Path, kind: str, message: str) -> None:
    root = make_fake_fss(tmp_path / "f", per_class=3)
    path = root / "bus" / "1.png"
    mask = (np.asarray(Image.open(path).convert("L")) >= 128).astype(np.uint8)
    if kind == "palette":
        im = Image.fromarray(mask, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    elif kind == "zero_one":
        im = Image.fromarray(mask)
    elif kind == "colour":
        im = Image.fromarray(np.stack([mask * 255, mask * 255, np.zeros_like(mask)], axis=2))
    else:
        im = Image.fromarray(mask.astype(np.uint16) * 255)
    im.save(path)
    with pytest.raises(DatasetError, match=message):
        _dm(root, tmp_path).source("train").load_label("bus/1")
