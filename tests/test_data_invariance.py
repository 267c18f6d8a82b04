"""Image-local labels (FSS-1000, LVIS) left the VOC / COCO / synthetic episodes bit-identical.

``data/episodes_reference.json`` holds test lists and training episodes (ids, classes and
mask hashes) computed by the code before image-local labels were added; they must not change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import GEN

from datamodules import Coco20iDataModule, Pascal5iDataModule, SyntheticDataModule
from datamodules.fake import make_fake_coco, make_fake_voc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

EXPECTED = json.loads((Path(__file__).parent / "data" / "episodes_reference.json").read_text())


def _hash(t) -> str:
    return hashlib.sha1(np.ascontiguousarray(t.numpy()).tobytes()).hexdigest()[:16]


def _train(ds, keys) -> list:
    out = []
    for k in keys:
        s = ds[k]
        masks = [_hash(s["query_mask"]), _hash(s["query_semantic"]), _hash(s["support_masks"])]
        out.append([s["query_id"], int(s["class_id"]), s["support_ids"], *masks])
    return out


def _eval(ds) -> list:
    s = ds[0]
    return [_hash(s[k]) for k in ("query_mask", "query_label_orig", "support_masks", "query_semantic")]


def _lists(dm) -> list:
    return [[q, c, s] for q, c, s in dm.episode_list("test")]


def test_pascal_lists_and_training_episodes_unchanged(tmp_path: Path) -> None:
    voc = make_fake_voc(tmp_path / "voc", per_class=3)
    kw = {"root": str(voc), "fold": 1, "shot": 2, "image_size": 64, "num_workers": 0, "test_episodes": 8}
    for protocol in ("spec", "mmformer"):
        dm = Pascal5iDataModule(cache_dir=str(tmp_path / protocol), protocol=protocol, val_episodes=4, **kw)
        assert _lists(dm) == EXPECTED[f"pascal_{protocol}"]
        assert _eval(dm.eval_dataset("test")) == EXPECTED[f"pascal_{protocol}_eval0"]
    dm = Pascal5iDataModule(cache_dir=str(tmp_path / "spec"), val_episodes=4, **kw)
    assert _train(dm.train_dataset(), (0, 1, 7, 100)) == EXPECTED["pascal_train"]


def test_synthetic_list_and_training_episodes_unchanged(synthetic_root: Path, tmp_path: Path) -> None:
    dm = SyntheticDataModule(
        root=str(synthetic_root),
        **GEN,
        pool_min_pixels=50,
        image_size=64,
        num_workers=0,
        test_episodes=6,
        val_episodes=4,
        cache_dir=str(tmp_path / "cache"),
    )
    assert _lists(dm) == EXPECTED["synthetic"]
    assert _eval(dm.eval_dataset("test")) == EXPECTED["synthetic_eval0"]
    assert _train(dm.train_dataset(), (0, 3)) == EXPECTED["synthetic_train"]


def test_coco_list_and_training_episodes_unchanged(tmp_path: Path) -> None:
    coco = make_fake_coco(tmp_path / "coco", per_class=2)
    dm = Coco20iDataModule(
        root=str(coco), fold=0, image_size=64, num_workers=0, test_episodes=5, cache_dir=str(tmp_path / "c")
    )
    assert _lists(dm) == EXPECTED["coco"]
    assert _train(dm.train_dataset(), (0, 5)) == EXPECTED["coco_train"]
