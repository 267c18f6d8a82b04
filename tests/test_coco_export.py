"""COCO export of class-index label maps: pycocotools round trip, instances, resume, merge; palette PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fewshot_seg.atomic import write_atomic
from fewshot_seg.coco_export import AnnotationsError, CocoAnnotations, merge
from fewshot_seg.label_maps import class_colors, label_image, write_label_png
from fewshot_seg.multiclass import read_index_mask
from fewshot_seg.visualize import class_overlay

NAMES = ["scratch", "dent"]


def _labels(h: int = 30, w: int = 40, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 in two separate blobs, class 2 in one; a confidence map that differs per pixel."""
    labels = np.zeros((h, w), np.uint8)
    labels[2:8, 3 + shift : 10 + shift] = 1
    labels[20:27, 30:38] = 1
    labels[10:18, 12:25] = 2
    confidence = np.linspace(0.0, 1.0, h * w, dtype=np.float32).reshape(h, w)
    return labels, confidence


@pytest.mark.parametrize("instances", [False, True])
def test_round_trip_through_pycocotools(tmp_path: Path, instances: bool) -> None:
    coco = CocoAnnotations(NAMES)
    maps = {"a.jpg": _labels(), "sub/b.png": _labels(24, 50, shift=4)}
    for name, (labels, conf) in maps.items():
        coco.add(name, labels, conf, instances=instances)
    path = coco.write(tmp_path / "annotations.json")
    api = COCO(str(path))
    assert [c["name"] for c in api.loadCats(api.getCatIds())] == NAMES
    for image in api.loadImgs(api.getImgIds()):
        labels, conf = maps[image["file_name"]]
        assert (image["height"], image["width"]) == labels.shape
        anns = api.loadAnns(api.getAnnIds(imgIds=image["id"]))
        assert len(anns) == (3 if instances else 2)  # class 1 has two components
        for c in (1, 2):
            own = [a for a in anns if a["category_id"] == c]
            union = np.zeros(labels.shape, bool)
            for a in own:
                m = api.annToMask(a).astype(bool)
                assert not (union & m).any()
                union |= m
                assert a["area"] == m.sum()
                x, y, w, h = a["bbox"]
                ys, xs = np.nonzero(m)
                assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
                assert a["score"] == pytest.approx(conf[m].mean(), abs=1e-6)
            assert np.array_equal(union, labels == c)


def test_resume_completes_without_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "annotations.json"
    first = CocoAnnotations.load_or_new(path, NAMES)
    for name in ("a.jpg", "b.jpg"):
        first.add(name, *_labels())
    first.write(path)
    resumed = CocoAnnotations.load_or_new(path, NAMES)
    assert "a.jpg" in resumed and "c.jpg" not in resumed
    resumed.add("c.jpg", *_labels())
    resumed.add("a.jpg", *_labels(shift=5))  # re-done (--overwrite): replaced, same image id
    data = json.loads(resumed.write(path).read_text())
    ids = {im["file_name"]: im["id"] for im in data["images"]}
    assert ids == {"a.jpg": 1, "b.jpg": 2, "c.jpg": 3}
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) == 6
    assert sum(a["image_id"] == 1 for a in data["annotations"]) == 2
    with pytest.raises(AnnotationsError, match=r"annotations\.json has the classes \['scratch', 'dent'\]"):
        CocoAnnotations.load_or_new(path, ["scratch", "hole"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AnnotationsError, match=r"bad\.json"):
        CocoAnnotations.load(tmp_path / "bad.json")


def test_merge_of_rank_parts(tmp_path: Path) -> None:
    old = CocoAnnotations(NAMES)
    old.add("a.jpg", *_labels())
    old.write(tmp_path / "annotations.json")
    parts = []
    for rank, names in enumerate([["b.jpg", "d.jpg"], ["c.jpg", "a.jpg"]]):
        part = CocoAnnotations(NAMES)
        for name in names:
            part.add(name, *_labels(shift=rank))
        parts.append(part.write(tmp_path / f"annotations.rank{rank}.json"))
    merged = merge([tmp_path / "annotations.json", *parts], NAMES)
    path = merged.write(tmp_path / "merged.json")
    api = COCO(str(path))
    files = sorted(im["file_name"] for im in api.loadImgs(api.getImgIds()))
    assert files == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    data = json.loads(path.read_text())
    assert len({im["id"] for im in data["images"]}) == 4
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) == 8
    a_id = next(im["id"] for im in data["images"] if im["file_name"] == "a.jpg")
    a_mask = api.annToMask(
        next(a for a in data["annotations"] if a["image_id"] == a_id and a["category_id"] == 1)
    )
    assert np.array_equal(a_mask.astype(bool), _labels(shift=1)[0] == 1)  # the later part replaced it
    other = CocoAnnotations(["x"]).write(tmp_path / "other.json")
    with pytest.raises(AnnotationsError, match=r"other\.json"):
        merge([tmp_path / "annotations.json", other], NAMES)


def test_palette_png_keeps_values_and_shows_colours(tmp_path: Path) -> None:
    labels, _ = _labels()
    labels[0, 0] = 255
    path = write_label_png(tmp_path / "q_labels.png", labels)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.convert("RGB").getpixel((3, 2)) == (128, 0, 0)  # class 1: VOC's dark red
        assert im.convert("RGB").getpixel((12, 10)) == (0, 128, 0)  # class 2: VOC's green
    assert np.array_equal(read_index_mask(path), labels)  # usable again as a class-index support mask
    assert label_image(labels).getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    image = np.full((*labels.shape, 3), 200, np.uint8)
    over = np.asarray(class_overlay(image, labels, alpha=1.0))
    assert tuple(over[2, 3]) == class_colors()[1] and tuple(over[10, 12]) == class_colors()[2]
    assert tuple(over[0, 0]) == (200, 200, 200) and tuple(over[29, 0]) == (200, 200, 200)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "annotations.json"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["annotations.json"]
