"""Pascal-5i DataModule on a tiny VOC-format dataset written in tmp (real formats)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import Pascal5iDataModule
from datamodules.fake import make_fake_voc
from datamodules.sampling import TrainStepSampler
from fewshot_seg.episode import IGNORE_INDEX, EpisodeBatch, normalize_images


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("voc") / "VOC2012", per_class=3)


def _dm(root, tmp_path, **kw):
    kw.setdefault("image_size", 64)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 4)
    kw.setdefault("test_episodes", 12)
    kw.setdefault("val_episodes", 6)
    return Pascal5iDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("fold", range(4))
def test_fold_classes_match_spec(fold, tmp_path):
    dm = Pascal5iDataModule(root=str(tmp_path), fold=fold)
    assert dm.novel_classes == [5 * fold + k for k in range(1, 6)]
    assert dm.base_classes == [c for c in range(1, 21) if c not in dm.novel_classes]


def test_pool_rule_excludes_small_objects(voc_root, tmp_path):
    dm = _dm(voc_root, tmp_path)
    pools = dm.pools("train", list(range(1, 21)))
    for c in range(1, 21):
        # Each class is big in tr_cCC_* and small (< 2,048 px) in the images of class c - 1.
        assert pools[c] == [f"tr_c{c:02d}_{k}" for k in range(3)]
    small_in = "tr_c19_0"  # class 20 is the small object of class-19 images
    label = np.asarray(Image.open(voc_root / "SegmentationClassAug" / f"{small_in}.png"))
    assert 0 < (label == 20).sum() < 2048 and small_in not in pools[20]


def test_class_count_cache_reused_and_invalidated(voc_root, tmp_path):
    dm = _dm(voc_root, tmp_path)
    dm.pools("test", [1])
    cache = tmp_path / "cache" / "pascal5i_test_class_counts.json"
    data = json.loads(cache.read_text())
    # Poison the cached counts: a reused cache shows the poison, a rescan does not.
    data["counts"]["va_c01_0"] = {}
    cache.write_text(json.dumps(data))
    assert "va_c01_0" not in _dm(voc_root, tmp_path).pools("test", [1])[1]
    png = voc_root / "SegmentationClassAug" / "va_c01_0.png"
    Image.open(png).save(png)  # same content, new mtime -> fingerprint changes
    import os

    st = os.stat(png)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "va_c01_0" in _dm(voc_root, tmp_path).pools("test", [1])[1]


def test_training_episodes_follow_spec(voc_root, tmp_path):
    dm = _dm(voc_root, tmp_path, fold=0, shot=2)
    ds = dm.train_dataset()
    novel = set(dm.novel_classes)
    saw_novel_pixels = False
    for i in range(len(ds)):
        s = ds[i]
        c = int(s["class_id"])
        assert c in dm.base_classes and c not in novel
        assert s["query_id"] not in s["support_ids"] and len(set(s["support_ids"])) == 2
        assert all(sid in dm.pools("train", [c])[c] for sid in s["support_ids"])
        sem, mask = s["query_semantic"], s["query_mask"]
        assert not any((sem == n).any() for n in novel)
        assert set(torch.unique(mask).tolist()) <= {0, 1, IGNORE_INDEX} and (mask == 1).any()
        assert ((sem == c) == (mask == 1)).all()
        novel_only = (sem == IGNORE_INDEX) & (mask != IGNORE_INDEX)
        assert (mask[novel_only] == 0).all()  # novel pixels are background in the binary label
        saw_novel_pixels |= bool(novel_only.any())
        for m in s["support_masks"]:
            assert (m == 1).sum() >= dm.support_min_pixels
        assert s["query_image"].shape == (3, 64, 64) and s["support_images"].shape == (2, 3, 64, 64)
    assert saw_novel_pixels  # tr_c20_* hold a small class-1 object


def test_train_episodes_independent_of_workers(voc_root, tmp_path):
    dm = _dm(voc_root, tmp_path, shot=1)
    ds = dm.train_dataset()
    sampler = TrainStepSampler(4, 2, lambda: (3, 0, 1))  # the 4th and 5th batches of a single process
    assert list(sampler) == list(range(12, 20))
    loaders = [
        torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=n, collate_fn=dm_collate())
        for n in (0, 2)
    ]
    b0, b2 = (next(iter(ld)) for ld in loaders)
    assert b0.query_id == b2.query_id and b0.support_ids == b2.support_ids
    assert torch.equal(b0.query_image, b2.query_image) and torch.equal(b0.support_masks, b2.support_masks)
    # A key one pass over the queries later is another episode (another permutation, other draws).
    other_pass = ds[12 + len(ds.queries)]
    assert not torch.equal(other_pass["query_image"], b0.query_image[0])


def test_step_sampler_keys_by_step_and_rank():
    def keys(start, rank, world, batch, batches=3):
        return list(TrainStepSampler(batch, batches, lambda: (start, rank, world)))

    # Two processes with batch 2 draw, at every step, the keys one process with batch 4 draws.
    one = keys(5, 0, 1, 4)
    r0, r1 = keys(5, 0, 2, 2), keys(5, 1, 2, 2)
    assert not set(r0) & set(r1)
    for t in range(3):
        assert sorted(r0[2 * t : 2 * t + 2] + r1[2 * t : 2 * t + 2]) == one[4 * t : 4 * t + 4]
    # A resumed fit continues the key stream of an uninterrupted one.
    assert keys(0, 0, 1, 4, batches=6)[12:] == keys(3, 0, 1, 4)


def dm_collate():
    from fewshot_seg.episode import collate_episodes

    return collate_episodes


def test_test_list_fixed_and_saved(voc_root, tmp_path):
    a = _dm(voc_root, tmp_path, shot=2, episode_list_dir=str(tmp_path / "lists_a"))
    b = _dm(voc_root, tmp_path, shot=1, episode_list_dir=str(tmp_path / "lists_b"))
    la, lb = a.episode_list("test"), b.episode_list("test")
    assert la == lb and len(la) == 12
    assert all(c in a.novel_classes and q not in sup and len(set(sup)) == len(sup) for q, c, sup in la)
    files = list((tmp_path / "lists_a").glob("*test*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["episodes"][0][0] == la[0][0]
    # 1-shot episodes use the first support of the listed (max-shot) supports.
    ds1, ds5 = b.eval_dataset("test"), a.eval_dataset("test")
    for i in range(3):
        assert ds1[i]["support_ids"] == ds5[i]["support_ids"][:1]
    # The validation list is drawn with another seed.
    assert a.episode_list("val") != la[: len(a.episode_list("val"))]


def test_test_loader_same_with_workers(voc_root, tmp_path):
    batches = []
    for n in (0, 2):
        dm = _dm(voc_root, tmp_path, shot=1, num_workers=n, eval_batch_size=6)
        batches.append(list(dm.test_dataloader()))
    for b0, b2 in zip(*batches):
        assert isinstance(b0, EpisodeBatch)
        assert b0.query_id == b2.query_id and torch.equal(b0.query_image, b2.query_image)


def test_original_label_untouched_and_protocols(voc_root, tmp_path):
    dm = _dm(voc_root, tmp_path, shot=1)
    ds = dm.eval_dataset("test")
    s = ds[0]
    raw = np.asarray(Image.open(voc_root / "SegmentationClassAug" / f"{s['query_id']}.png"))
    expected = (raw == s["class_id"]).astype(np.int64)
    expected[raw == 255] = 255
    assert torch.equal(s["query_label_orig"].long(), torch.from_numpy(expected))
    h, w = raw.shape  # 72 x 96 -> long side 64: 48 x 64
    assert s["query_valid_size"].tolist() == [round(h * 64 / w), 64]
    vh = s["query_valid_size"][0]
    padding = normalize_images(s["query_image"])[:, vh:]  # the mean pixel, ~0 once normalised
    assert (s["query_mask"][vh:] == 255).all() and s["query_image"].dtype == torch.uint8
    assert padding.abs().max() < 0.02
    sq = _dm(voc_root, tmp_path, shot=1, protocol="square480").eval_dataset("test")[0]
    assert sq["query_valid_size"].tolist() == [64, 64]
    assert sq["query_label_orig"].shape == (64, 64) and torch.equal(sq["query_label_orig"], sq["query_mask"])


def test_arguments_are_the_saved_hyperparameters(tmp_path) -> None:
    root = make_fake_voc(tmp_path / "voc", per_class=2)
    dm = Pascal5iDataModule(root=str(root), fold=1, shot=2, image_size=64, test_episodes=7)
    assert (dm.fold, dm.shot, dm.image_size, dm.test_episodes) == (1, 2, 64, 7)
    assert dict(dm.hparams)["shot"] == 2  # one record: what checkpoints and loggers see
    with pytest.raises(AttributeError, match="shot is a constructor argument"):
        dm.shot = 5
    with pytest.raises(ValueError, match="not 'train'"):
        dm.episode_count_and_seed("train")  # was silently the validation list
