"""Evaluation protocols on tiny VOC- and COCO-format trees: the reference's ``mmformer`` sampler above all."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules import Coco20iDataModule, DatasetError, Pascal5iDataModule
from datamodules.fake import make_fake_coco, make_fake_voc
from datamodules.protocols import PROTOCOLS, get_protocol
from fewshot_seg.episode import collate_episodes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2

NUM = 100


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Image va_cCC_k: a big object of class CC (>= 2,048 px) and a small one (< 2,048 px) of CC % 20 + 1.
    return make_fake_voc(tmp_path_factory.mktemp("voc") / "VOC2012", per_class=3)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_coco(tmp_path_factory.mktemp("coco"), year=2014, per_class=3)


def _voc(root: Path, tmp: Path, **kw) -> Pascal5iDataModule:
    kw = {"image_size": 96, "num_workers": 0, "test_episodes": NUM, "val_episodes": 10, **kw}
    return Pascal5iDataModule(root=str(root), cache_dir=str(tmp / "cache"), **kw)


def test_unknown_protocol_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown evaluation protocol 'hsnet'.*mmformer"):
        Pascal5iDataModule(root=str(tmp_path), protocol="hsnet")
    assert sorted(PROTOCOLS) == ["hsnet_fss", "lvis92i", "mmformer", "patnet", "spec", "square480"]


def test_mmformer_class_among_all_present_novel_classes(voc_root: Path, tmp_path: Path) -> None:
    dm = _voc(voc_root, tmp_path, protocol="mmformer", shot=5)
    episodes = dm.episode_list("test")
    assert len(episodes) == NUM
    counts = dm.class_counts("test")
    novel = set(dm.novel_classes)
    for q, c, _ in episodes:
        assert c in novel and counts[q][c] > 0
    # va_c01_*: class 1 big (its pool) and class 2 small (under 2,048 px, not in class 2's pool for
    # that image); the small novel class is still drawn as the episode class of such a query.
    small = [(q, c) for q, c, _ in episodes if q.startswith("va_c01_") and c == 2]
    assert small and all(counts[q][2] < 2048 for q, _ in small)
    assert not any(q in dm.pools("test", [2])[2] for q, _ in small)
    # va_c20_*: the novel class 1 is there only small: the image is not in the test-image list.
    assert not any(q.startswith("va_c20_") for q, _, _ in episodes)


def test_mmformer_query_frequencies_balanced(voc_root: Path, tmp_path: Path) -> None:
    dm = _voc(voc_root, tmp_path, protocol="mmformer")
    listed = sorted({i for ids in dm.pools("test", dm.novel_classes).values() for i in ids})
    freq = Counter(q for q, _, _ in dm.episode_list("test"))
    assert set(freq) == set(listed)  # every listed image is a query
    reps = math.ceil(NUM / len(listed))
    dropped = reps * len(listed) - NUM  # whole passes, shuffled once, the first NUM taken
    assert max(freq.values()) <= reps and min(freq.values()) >= reps - dropped
    assert sum(reps - n for n in freq.values()) == dropped


def test_mmformer_supports_lists_and_scoring(voc_root: Path, tmp_path: Path) -> None:
    five = _voc(voc_root, tmp_path, protocol="mmformer", shot=5, episode_list_dir=str(tmp_path / "a"))
    one = _voc(voc_root, tmp_path, protocol="mmformer", shot=1, episode_list_dir=str(tmp_path / "b"))
    l5, l1 = five.episode_list("test"), one.episode_list("test")
    assert l5 == l1  # drawn once with max_shot supports, whatever the run's shot
    pools = five.pools("test", five.novel_classes)
    for q, c, sup in l5:
        assert q not in sup and all(s in pools[c] for s in sup)
        if len(pools[c]) > 5:
            assert len(set(sup)) == 5
    # The saved list says which rule drew it; the spec list is another file.
    (path,) = (tmp_path / "a").glob("*test_mmformer*.json")
    assert json.loads(path.read_text())["draws"] == "mmformer"
    assert five.episode_list_file("test") == path
    # The 1-shot run uses the first support of the 5-shot list; scoring at image_size squares.
    ds1, ds5 = one.eval_dataset("test"), five.eval_dataset("test")
    for i in range(4):
        e1, e5 = ds1[i], ds5[i]
        assert e1["support_ids"] == e5["support_ids"][:1]
        assert tuple(e1["query_label_orig"].shape) == (96, 96) and tuple(e1["query_valid_size"].tolist()) == (
            96,
            96,
        )


def test_mmformer_list_reproducible_across_runs_and_workers(voc_root: Path, tmp_path: Path) -> None:
    a = _voc(voc_root, tmp_path, protocol="mmformer", episode_list_dir=str(tmp_path / "a"))
    b = _voc(voc_root, tmp_path, protocol="mmformer", episode_list_dir=str(tmp_path / "b"))
    assert a.episode_list("test") == b.episode_list("test")
    ds = a.eval_dataset("test")
    batches = [
        next(iter(torch.utils.data.DataLoader(ds, batch_size=6, num_workers=n, collate_fn=collate_episodes)))
        for n in (0, 2)
    ]
    assert batches[0].query_id == batches[1].query_id and batches[0].support_ids == batches[1].support_ids
    assert torch.equal(batches[0].query_image, batches[1].query_image)
    # Another seed, another list; the spec protocol's list is another rule entirely.
    assert _voc(voc_root, tmp_path, protocol="mmformer", test_seed=7).episode_list("test") != a.episode_list(
        "test"
    )
    assert _voc(voc_root, tmp_path, protocol="spec").episode_list("test") != a.episode_list("test")


def test_mmformer_on_coco(coco_root: Path, tmp_path: Path) -> None:
    def coco(num: int) -> Coco20iDataModule:
        kw = {"fold": 1, "protocol": "mmformer", "image_size": 64, "num_workers": 0}
        return Coco20iDataModule(root=str(coco_root), test_episodes=num, cache_dir=str(tmp_path / "c"), **kw)

    probe = coco(10)
    listed = sorted({i for ids in probe.pools("test", probe.novel_classes).values() for i in ids})
    dm = coco(2 * len(listed))  # two whole passes: every listed image is a query exactly twice
    episodes = dm.episode_list("test")
    counts, novel = dm.class_counts("test"), set(dm.novel_classes)
    assert Counter(q for q, _, _ in episodes) == {q: 2 for q in listed}
    for q, c, sup in episodes:
        assert c in novel and counts[q][c] > 0 and q not in sup
    sample = dm.eval_dataset("test")[0]
    assert tuple(sample["query_label_orig"].shape) == (64, 64)


def test_square480_same_episodes_as_spec_scored_at_square(voc_root: Path, tmp_path: Path) -> None:
    spec, square = _voc(voc_root, tmp_path, protocol="spec"), _voc(voc_root, tmp_path, protocol="square480")
    assert spec.episode_list("test") == square.episode_list("test")
    assert spec.episode_list_file("test") == square.episode_list_file("test")
    assert get_protocol("square480").square and not get_protocol("spec").square
    s, q = spec.eval_dataset("test")[0], square.eval_dataset("test")[0]
    assert tuple(q["query_label_orig"].shape) == (96, 96) and tuple(s["query_label_orig"].shape) == (72, 96)


# ---- benchmark protocols (docs/benchmarks.md) on hand-made pools ---------------------------------
POOLS = {3: ["a1", "a10", "a2"], 7: ["b1", "b2"], 9: ["c1", "c2", "c3", "c4"]}


def test_hsnet_fss_every_image_once_or_a_fixed_uniform_count() -> None:
    p = get_protocol("hsnet_fss")
    assert p.square and p.published_size == 400
    once = p.draw(POOLS, {}, 9, 5, seed=0)
    assert [(q, c) for q, c, _ in once] == [(q, c) for c in (3, 7, 9) for q in POOLS[c]]
    assert all(len(s) == 5 and q not in s and set(s) <= set(POOLS[c]) for q, c, s in once)
    assert any(len(set(s)) < len(s) for _, _, s in once)  # repeats allowed (b: one candidate)
    fixed = p.draw(POOLS, {}, 40, 1, seed=0)
    assert len(fixed) == 40 and {q for q, _, _ in fixed} == {q for ids in POOLS.values() for q in ids}
    assert p.draw(POOLS, {}, 40, 1, seed=0) == fixed != p.draw(POOLS, {}, 40, 1, seed=1)


def test_patnet_and_lvis92i_round_robin() -> None:
    for name, size in (("patnet", 400), ("lvis92i", 518)):
        p = get_protocol(name)
        assert p.square and p.published_size == size and p.draws == "round_robin"
        episodes = p.draw(POOLS, {}, 30, 5, seed=0)
        assert [c for _, c, _ in episodes] == [3, 7, 9] * 10
        assert all(q in POOLS[c] and q not in s and set(s) <= set(POOLS[c]) for q, c, s in episodes)
    with pytest.raises(DatasetError, match=r"classes \[7\] have fewer than 2 test images"):
        get_protocol("patnet").draw({**POOLS, 7: ["b1"]}, {}, 6, 1, seed=0)
