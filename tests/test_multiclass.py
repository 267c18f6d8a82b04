"""N-way inference: ``Segmenter.encode_classes`` / ``segment_classes``, merge rule, class-index supports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DatasetError
from fewshot_seg import Segmenter
from fewshot_seg.multiclass import collect_examples, examples_from_folder, merge_class_maps

TOL = 1e-4


@pytest.fixture(scope="module")
def segmenter(stage2_ckpt: Path) -> Segmenter:
    return Segmenter.from_checkpoint(stage2_ckpt, device="cpu")


def _two_class_episode(root: Path) -> tuple[Path, list[tuple[str, Path, np.ndarray]]]:
    """The first synthetic validation image holding two classes, and one other image showing each class."""
    labels = {
        p.stem: np.array(Image.open(p)) for p in sorted((root / "SegmentationClassAug").glob("val_*.png"))
    }

    def classes(label: np.ndarray) -> list[int]:
        return [int(v) for v in np.unique(label) if v not in (0, 255)]

    query = next(k for k, lab in labels.items() if len(classes(lab)) >= 2)
    supports = []
    for c in classes(labels[query])[:2]:
        other = next(k for k, lab in labels.items() if k != query and c in classes(lab))
        supports.append(
            (f"class{c}", root / "JPEGImages" / f"{other}.jpg", (labels[other] == c).astype(np.uint8))
        )
    return root / "JPEGImages" / f"{query}.jpg", supports


def test_two_classes_where_the_single_class_runs_put_them(stage2_ckpt: Path, synthetic_root: Path) -> None:
    segmenter = Segmenter.from_checkpoint(stage2_ckpt, device="cpu")
    # The 3-step test model's maps stay below 0.05: sharpened 15x (a steeper Mask Matching output, as
    # training makes it) so that the threshold is crossed and the merge rule is exercised on both sides.
    with torch.no_grad():
        segmenter.mask_matching.fc2.weight.mul_(15)
        segmenter.mask_matching.fc2.bias.mul_(15)
    query, supports = _two_class_episode(synthetic_root)
    classes = segmenter.encode_classes([(name, img, mask) for name, img, mask in supports])
    assert classes.names == tuple(name for name, _, _ in supports)
    [result] = segmenter.segment_classes([query], classes, return_probabilities=True)
    singles = np.stack(
        [
            segmenter.segment([query], segmenter.encode_supports([img], [mask]), return_probabilities=True)[0]
            for _, img, mask in supports
        ]
    )
    assert result.labels.dtype == np.uint8 and result.labels.shape == singles.shape[1:]
    np.testing.assert_allclose(
        result.probabilities, singles, atol=1e-5
    )  # Mask Matching per class = single run
    best = singles.max(0)
    np.testing.assert_allclose(result.confidence, best, atol=1e-5)
    # A pixel is the class of highest single-class probability where that passes 0.5, background elsewhere
    # (pixels within TOL of the threshold or of a tie are left out: float noise could decide them).
    sure = np.abs(best - 0.5) > TOL
    top = singles >= best[None] - TOL  # the classes tied for the highest probability
    assert np.all(result.labels[sure & (best < 0.5)] == 0)
    on = sure & (best > 0.5)
    idx = result.labels[on].astype(int) - 1
    assert np.all(idx >= 0) and np.all(top[:, on][idx, np.arange(idx.size)])
    assert sure.mean() > 0.99
    masks = [segmenter.segment([query], segmenter.encode_supports([img], [m]))[0] for _, img, m in supports]
    for i, mask in enumerate(masks, start=1):
        assert np.all(mask[result.labels == i] == 1)  # a class labels only pixels its single run marks
    assert (result.labels != 0).mean() > 0.1 and (result.labels == 0).mean() > 0.1  # both sides exercised
    assert result.fractions(2) == [float((result.labels == i).mean()) for i in (1, 2)]


def test_both_classes_come_back_in_their_regions(
    segmenter: Segmenter, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mask Matching replaced by maps known per class (the test model does not tell two classes apart):
    each class comes back where its single-class run puts it, at the query's size."""
    query, supports = _two_class_episode(synthetic_root)
    classes = segmenter.encode_classes([(name, img, mask) for name, img, mask in supports])
    size = segmenter.image_size
    left, right = torch.zeros(1, size, size), torch.zeros(1, size, size)
    left[..., : size // 3] = 0.9
    right[..., size // 3 :] = 0.7
    right[..., : size // 4] = 0.6  # overlaps the left class, which is more probable there
    maps = {id(classes.supports[0].encoding): left, id(classes.supports[1].encoding): right}
    monkeypatch.setattr(
        segmenter.mask_matching, "match", lambda feats, enc, logits, image_size: {"foreground": maps[id(enc)]}
    )
    [result] = segmenter.segment_classes([query], classes)
    singles = [segmenter.segment([query], s)[0] for s in classes.supports]
    assert {1, 2} <= set(np.unique(result.labels).tolist())
    expected = np.where(singles[0] == 1, 1, np.where(singles[1] == 1, 2, 0))
    assert np.array_equal(result.labels, expected)


def test_backbone_and_pos_run_once_for_all_classes(
    segmenter: Segmenter, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    query, supports = _two_class_episode(synthetic_root)
    name, img, mask = supports[0]
    classes = segmenter.encode_classes({f"{name}-{k}": [(img, mask)] for k in range(3)})
    calls = {"backbone": 0, "pos": 0, "match": 0}
    hooks = [
        segmenter.backbone.register_forward_hook(
            lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)
        ),
        segmenter.pos.register_forward_hook(lambda *_: calls.__setitem__("pos", calls["pos"] + 1)),
    ]
    match = segmenter.mask_matching.match

    def counted(*args: object, **kwargs: object) -> dict:
        calls["match"] += 1
        return match(*args, **kwargs)

    monkeypatch.setattr(segmenter.mask_matching, "match", counted)
    try:
        results = segmenter.segment_classes([query, query], classes, batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"backbone": 1, "pos": 1, "match": 3}  # one batch of 2 queries, 3 classes
    assert np.array_equal(results[0].labels, results[1].labels)
    assert set(np.unique(results[0].labels)) <= {0, 1}  # equal supports: ties go to the first class


def test_merge_rule() -> None:
    a = torch.tensor([[0.9, 0.2, 0.7, 0.6]])
    b = torch.tensor([[0.3, 0.4, 0.8, 0.6]])
    labels, best = merge_class_maps(iter([a, b]))
    assert labels.tolist() == [[1, 0, 2, 1]]  # highest passing class; none passing -> 0; tie -> first
    assert torch.equal(best, torch.maximum(a, b))


def _support_files(folder: Path) -> tuple[Path, Path]:
    """A 40x40 image and a class-index mask: class 1 top-left, class 2 bottom-right, an ignored strip."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "both.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    index = np.zeros((40, 40), np.uint8)
    index[2:15, 2:15] = 1
    index[22:38, 20:38] = 2
    index[:, 39] = 255
    Image.fromarray(index).save(folder / "both_mask.png")
    return image, folder / "both_mask.png"


def test_class_index_mask_gives_each_class_its_support(tmp_path: Path) -> None:
    image, mask = _support_files(tmp_path / "supports")
    (tmp_path / "supports" / "classes.txt").write_text("scratch\ndent\n\n")
    examples = collect_examples(indexed=[(image, mask)], class_names=tmp_path / "supports" / "classes.txt")
    assert examples.names == ["scratch", "dent"]
    index = np.array(Image.open(mask))
    for value, name in enumerate(examples.names, start=1):
        [ex] = examples.examples[name]
        assert np.array_equal(ex.mask == 1, index == value)
        assert np.array_equal(ex.mask == 255, index == 255)  # ignore stays ignore; the other class is 0
    # A --supports DIR tree: the class-index image plus a folder per class with binary masks.
    sub = tmp_path / "supports" / "dent"
    sub.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(sub / "d1.jpg")
    binary = np.zeros((20, 20), np.uint8)
    binary[5:15, 5:15] = 255
    Image.fromarray(binary).save(sub / "d1_mask.png")
    tree = examples_from_folder(tmp_path / "supports")
    assert tree.names == ["scratch", "dent"] and [len(tree.examples[n]) for n in tree.names] == [1, 2]
    (sub / "d2.jpg").write_bytes((sub / "d1.jpg").read_bytes())
    with pytest.raises(DatasetError, match=r"d2\.jpg has no mask d2_mask\.png"):
        examples_from_folder(tmp_path / "supports")
    (tmp_path / "supports" / "classes.txt").unlink()
    (sub / "d2.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"class-index masks \(both_mask\.png, \.\.\.\) but no classes\.txt"
    ):
        examples_from_folder(tmp_path / "supports")


def test_bad_inputs_named_in_one_line(segmenter: Segmenter, tmp_path: Path) -> None:
    image, mask = _support_files(tmp_path)
    binary = (np.array(Image.open(mask)) == 1).astype(np.uint8)
    cases = [
        (
            dict(classes={"scratch": [(image, binary)]}, class_names=["scratch", "dent"]),
            "class 'dent' has no support",
        ),
        (dict(indexed=[(image, mask)], class_names=["scratch", "scratch"]), "'scratch' is given twice"),
        (
            dict(indexed=[(image, mask)], class_names=["scratch"]),
            r"both_mask\.png holds the value 2, which is no class",
        ),
        (dict(indexed=[(image, mask)]), "class-index masks need the class names"),
        (
            dict(classes=[("hole", image, binary)], class_names=["scratch"]),
            "class 'hole', which is not among",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(DatasetError, match=message) as err:
            segmenter.encode_classes(**kwargs)
        assert "\n" not in str(err.value)
    (tmp_path / "classes.txt").write_text("scratch\ndent\nscratch\n")
    with pytest.raises(
        DatasetError, match=r"classes\.txt: class name 'scratch' is given twice \(classes 1 and 3\)"
    ):
        segmenter.encode_classes(indexed=[(image, mask)], class_names=tmp_path / "classes.txt")
    # One object pixel in a 400 x 400 support: gone once resized to the 64-px model input.
    big = np.zeros((400, 400, 3), np.uint8)
    dot = np.zeros((400, 400), np.uint8)
    dot[201, 201] = 1
    with pytest.raises(
        DatasetError, match=r"class 'tiny'.* marks no object pixel once resized to the model input"
    ):
        segmenter.encode_classes({"scratch": [(image, binary)], "tiny": [(big, dot)]})
