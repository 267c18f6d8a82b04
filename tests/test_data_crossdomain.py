"""PATNet's cross-domain test sets (Deepglobe, ISIC-2018, Chest X-ray) on tiny trees in their layouts."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ChestXrayDataModule, DatasetError, DeepglobeDataModule, ISIC2018DataModule
from datamodules.fake import make_fake_chestxray, make_fake_deepglobe, make_fake_isic
from fewshot_seg.episode import collate_episodes

SETS = {
    "deepglobe": (DeepglobeDataModule, make_fake_deepglobe, 6),
    "isic2018": (ISIC2018DataModule, make_fake_isic, 3),
    "chestxray": (ChestXrayDataModule, make_fake_chestxray, 1),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cross")
    return {name: make(tmp / name) for name, (_, make, _) in SETS.items()}


def _dm(name: str, root: Path, tmp: Path, **kw):
    kw = {"image_size": 48, "num_workers": 0, "batch_size": 2, "val_episodes": 6, **kw}
    return SETS[name][0](root=str(root), cache_dir=str(tmp / "cache"), **kw)


@pytest.mark.parametrize("name", sorted(SETS))
def test_patnet_protocol_defaults_and_round_robin(name: str, roots: dict, tmp_path: Path) -> None:
    dm = _dm(name, roots[name], tmp_path, shot=5)
    n = SETS[name][2]
    assert dm.novel_classes == list(range(1, n + 1)) and dm.base_classes == []
    assert dm.test_episodes == 600 and dm.eval_protocol.name == "patnet" and dm.test_seed == 0
    assert SETS[name][0]().image_size == 400  # PATNet's test size by default
    episodes = dm.episode_list("test")
    assert len(episodes) == 600 and [c for _, c, _ in episodes[: 2 * n]] == list(range(1, n + 1)) * 2
    assert Counter(c for _, c, _ in episodes) == {c: 600 // n for c in range(1, n + 1)}
    pools = dm.pools("test", dm.novel_classes)
    for q, c, sup in episodes:
        assert q in pools[c] and len(sup) == 5 and q not in sup and all(s in pools[c] for s in sup)
    queries = Counter(q for q, c, _ in episodes if c == 1)
    assert set(queries) == set(pools[1])  # queries uniform over the class: every image appears


@pytest.mark.parametrize("name", sorted(SETS))
def test_test_only_and_provenance(name: str, roots: dict, tmp_path: Path) -> None:
    dm = _dm(name, roots[name], tmp_path)
    with pytest.raises(
        DatasetError, match=rf"{name} is test-only: models are trained on Pascal-5i or COCO-20i"
    ):
        dm.train_dataloader()
    dm.setup("test")
    prov = dm.provenance()
    assert prov["dataset"] == name and prov["base_classes"] == [] and prov["protocol"] == "patnet"
    assert prov["episode_lists"]["test"]["sha256"] is not None


@pytest.mark.parametrize("name", sorted(SETS))
def test_lists_reproducible_and_labels_binary(name: str, roots: dict, tmp_path: Path) -> None:
    a = _dm(name, roots[name], tmp_path, test_episodes=12, episode_list_dir=str(tmp_path / "a"))
    b = _dm(name, roots[name], tmp_path, test_episodes=12, episode_list_dir=str(tmp_path / "b"))
    assert a.episode_list("test") == b.episode_list("test")
    ds = a.eval_dataset("test")
    batches = [
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=n, collate_fn=collate_episodes)))
        for n in (0, 2)
    ]
    assert batches[0].query_id == batches[1].query_id
    assert torch.equal(batches[0].query_mask, batches[1].query_mask)
    batch = batches[0]
    assert set(batch.query_mask.unique().tolist()) <= {0, 1}
    assert set(batch.support_masks.unique().tolist()) <= {0, 1}
    assert all(tuple(t.shape) == (48, 48) for t in batch.query_label_orig)  # scored at image_size squares
    src = a.source("test")
    for q in batch.query_id:  # the label is the thresholded mask file
        assert np.array_equal(
            src.load_label(q), (np.asarray(Image.open(src.items[q].mask).convert("L")) >= 128)
        )


def test_deepglobe_tiles_per_class_folder(roots: dict, tmp_path: Path) -> None:
    dm = _dm("deepglobe", roots["deepglobe"], tmp_path)
    src = dm.source("test")
    shared = {i.split("/")[1] for i in src.ids if i.startswith("1/")} & {
        i.split("/")[1] for i in src.ids if i.startswith("2/")
    }
    assert shared  # one tile, a mask per class it shows
    tile = sorted(shared)[0]
    assert src.label_classes(f"1/{tile}") == {1: 1} and src.label_classes(f"2/{tile}") == {1: 2}
    assert dm.class_name(1) == "agriculture_land" and dm.class_name(6) == "barren_land"


def test_isic_class_folders_and_names(roots: dict, tmp_path: Path) -> None:
    dm = _dm("isic2018", roots["isic2018"], tmp_path)
    # DMTNet's sorting script (ChenJiayi68/DMTNet data/isic_preprocess.py): 1 nevus, 2 melanoma, 3 SK.
    assert [dm.class_name(c) for c in (1, 2, 3)] == ["nevus", "melanoma", "seborrheic_keratosis"]
    assert len(dm.pools("test", [1, 2, 3])[2]) == 5
    renamed = _dm("isic2018", roots["isic2018"], tmp_path, class_names=["a", "b", "c"])
    assert renamed.provenance()["class_names"] == {"1": "a", "2": "b", "3": "c"}


def test_chestxray_naming(roots: dict, tmp_path: Path) -> None:
    src = _dm("chestxray", roots["chestxray"], tmp_path).source("test")
    assert "MCUCXR_0001_0" in src.ids  # Montgomery mask named <id>.png
    assert "MCUCXR_0002_1" not in src.ids  # X-ray without a mask: not used
    assert len(src.ids) == 6


def test_errors_name_the_file(tmp_path: Path) -> None:
    dg = make_fake_deepglobe(tmp_path / "dg")
    tile = next((dg / "3" / "test" / "origin").glob("*.jpg"))
    tile.unlink()
    with pytest.raises(
        DatasetError, match=rf"mask .*3/test/groundtruth/{tile.stem}.png has no image: expected .*origin"
    ):
        _dm("deepglobe", dg, tmp_path).setup("test")
    (dg / "3" / "test" / "groundtruth" / f"{tile.stem}.png").unlink()
    shutil.rmtree(dg / "6")
    with pytest.raises(DatasetError, match=r"image folder not found: .*6/test/origin"):
        _dm("deepglobe", dg, tmp_path).setup("test")

    isic = make_fake_isic(tmp_path / "isic")
    (isic / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000004_segmentation.png").unlink()
    with pytest.raises(
        DatasetError, match=r"ISIC_0000004.jpg has no mask: expected .*ISIC_0000004_segmentation.png"
    ):
        _dm("isic2018", isic, tmp_path).setup("test")
    (isic / "ISIC2018_Task1-2_Training_Input" / "2" / "ISIC_0000004.jpg").unlink()
    (isic / "ISIC2018_Task1-2_Training_Input" / "3" / "ISIC_0000009.jpg").unlink()
    with pytest.raises(DatasetError, match=r"mask .*ISIC_0000009_segmentation.png has no image"):
        _dm("isic2018", isic, tmp_path).setup("test")
    shutil.rmtree(isic / "ISIC2018_Task1-2_Training_Input" / "3")
    with pytest.raises(
        DatasetError, match=r"class folder 3 \(seborrheic_keratosis; sort the images by diagnosis\) not found"
    ):
        _dm("isic2018", isic, tmp_path).setup("test")

    cxr = make_fake_chestxray(tmp_path / "cxr")
    (cxr / "CXR_png" / "CHNCXR_0002_1.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"mask .*CHNCXR_0002_1_mask.png has no image: expected .*CXR_png/CHNCXR_0002_1.png",
    ):
        _dm("chestxray", cxr, tmp_path).setup("test")
    colour = np.zeros((40, 36, 3), np.uint8)
    colour[5:20, 5:20] = (255, 255, 0)  # a raw DeepGlobe-style colour label
    Image.fromarray(colour).save(cxr / "masks" / "CHNCXR_0003_0_mask.png")
    (cxr / "masks" / "CHNCXR_0002_1_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"mask .*CHNCXR_0003_0_mask.png is a colour label"):
        _dm("chestxray", cxr, tmp_path).setup("test")


def _published_resize(image: np.ndarray, size: int) -> np.ndarray:
    """What PATNet / HSNet feed the model: torchvision ``Resize((size, size))`` of the PIL image."""
    from torchvision import transforms

    return np.asarray(transforms.Resize((size, size))(Image.fromarray(image)))


@pytest.mark.parametrize("name", sorted(SETS))
def test_published_antialiased_resize_is_the_default(name: str, tmp_path: Path) -> None:
    root = SETS[name][1](tmp_path / name, size=(300, 260))  # shrunk to 48: where antialiasing matters
    dm = _dm(name, root, tmp_path)
    assert dm.image_resize == "pil" and dm.provenance()["image_resize"] == "pil"
    dm.setup("test")
    query_id = dm.episode_list("test")[0][0]
    image = dm.source("test").load_image(query_id)
    expected = _published_resize(image, 48)
    got, _, _ = dm._test.transform(image, np.zeros(image.shape[:2], np.uint8))
    assert np.array_equal(got, expected)
    # The cv2 resize of the other protocols stays available, and is not the same input.
    plain = _dm(name, root, tmp_path, image_resize="cv2")
    plain.setup("test")
    other, _, _ = plain._test.transform(image, np.zeros(image.shape[:2], np.uint8))
    assert np.abs(other.astype(int) - expected.astype(int)).mean() > 1.0
