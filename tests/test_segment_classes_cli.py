"""``fewshot-seg segment`` with classes: label PNGs, a manifest column per class, COCO that round-trips,
resume without duplicate ids, the supports in three forms, bad inputs in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_two_processes
from PIL import Image
from pycocotools.coco import COCO
from test_multiclass import _two_class_episode

from fewshot_seg import Segmenter
from fewshot_seg import segmenter as segmenter_module
from fewshot_seg.tools import segment_classes
from fewshot_seg.tools.segment import main
from fewshot_seg.tools.segment_record import PARTS_FOLDER

NAMES = ("left", "right")


@pytest.fixture(scope="module")
def sharp_ckpt(stage2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model with a 15x steeper Mask Matching output (as test_multiclass sharpens it): its maps
    cross 0.5, so label maps hold both classes and background and COCO files have annotations."""
    state = torch.load(stage2_ckpt, map_location="cpu", weights_only=False)
    for k in ("weight", "bias"):
        state["state_dict"][f"mm.fc2.{k}"] *= 15
    path = tmp_path_factory.mktemp("sharp") / "sharp.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def episode(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two supports (one per class, binary 0/255 PNGs) and a queries folder of three validation images."""
    root = tmp_path_factory.mktemp("episode")
    query, supports = _two_class_episode(synthetic_root)
    files = []
    for (_, img, mask), name in zip(supports, NAMES):
        shutil.copy(img, root / f"{name}.jpg")
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(root / f"{name}_mask.png")
        files.append((name, root / f"{name}.jpg", root / f"{name}_mask.png"))
    (root / "q" / "sub").mkdir(parents=True)
    shutil.copy(query, root / "q" / "a.jpg")
    others = sorted((synthetic_root / "JPEGImages").glob("val_*.jpg"))[:3]
    shutil.copy(others[0], root / "q" / "sub" / "b.jpg")
    shutil.copy(others[1], root / "q" / "c.jpg")
    return {"root": root, "supports": files, "extra": others[2]}


@pytest.fixture
def two_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1-step test model does not tell the two classes apart (class 2 wins everywhere): on the left half
    of the model input class 1's map becomes class 2's + 0.1, so that both classes come back in the label
    maps. The N-way forward is otherwise the real one (``multiclass.match_classes``)."""
    real = segmenter_module.match_classes

    def raised(*args: object, **kwargs: object) -> torch.Tensor:
        maps = real(*args, **kwargs).clone()  # [B, N, S, S]
        half = maps.shape[-1] // 2
        maps[:, 0, :, :half] = maps[:, 1, :, :half] + 0.1
        return maps

    monkeypatch.setattr(segmenter_module, "match_classes", raised)


def _class_args(ep: dict, ckpt: Path, out: Path, *extra: str) -> list[str]:
    classes = [a for name, img, mask in ep["supports"] for a in ("--class", name, str(img), str(mask))]
    where = ["--queries", str(ep["root"] / "q"), "--out", str(out), "--device", "cpu"]
    return ["--ckpt", str(ckpt), *classes, *where, *extra]


def _expected(ckpt: Path, ep: dict, rel: str) -> np.ndarray:
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    classes = seg.encode_classes([(n, i, m) for n, i, m in ep["supports"]])
    return seg.segment_classes([ep["root"] / "q" / rel], classes)[0].labels


def _manifest(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_coco(out: Path) -> COCO:
    """annotations.json loads with pycocotools; each image's annToMask union per class equals its PNG."""
    coco = COCO(str(out / "annotations.json"))
    data = json.loads((out / "annotations.json").read_text())
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert len({i["id"] for i in data["images"]}) == len(data["images"])
    assert [c["name"] for c in data["categories"]] == list(NAMES)
    for image in coco.dataset["images"]:
        labels = np.array(
            Image.open(out / (Path(image["file_name"]).with_suffix("").as_posix() + "_mask.png"))
        )
        assert labels.shape == (image["height"], image["width"])
        for c in (1, 2):
            union = np.zeros_like(labels, dtype=bool)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], catIds=[c])):
                union |= coco.annToMask(ann).astype(bool)
                assert 0.0 <= ann["score"] <= 1.0
            assert np.array_equal(union, labels == c)
    return coco


def test_two_classes_label_maps_manifest_and_coco(
    sharp_ckpt: Path, episode: dict, tmp_path: Path, two_regions: None
) -> None:
    out = tmp_path / "out"
    assert main(_class_args(episode, sharp_ckpt, out, "--overlay")) == 0
    png = Image.open(out / "a_mask.png")
    assert png.mode == "P"  # a palette: viewers show colours, values stay the class indices
    labels = np.array(png)
    expected = _expected(sharp_ckpt, episode, "a.jpg")
    assert np.array_equal(labels, expected)
    assert {1, 2} <= set(np.unique(labels).tolist())  # both classes come back, and background
    assert (out / "a_overlay.png").is_file() and (out / "sub" / "b_overlay.png").is_file()
    rows = {Path(r["query"]).name: r for r in _manifest(out / "manifest.csv")}
    assert list(_manifest(out / "manifest.csv")[0]) == [
        "query", "mask", "foreground_fraction", "fraction_left", "fraction_right", "status",
    ]  # fmt: skip
    assert rows["b.jpg"]["mask"] == "sub/b_mask.png" and rows["a.jpg"]["status"] == "written"
    for i, name in enumerate(NAMES, start=1):
        assert float(rows["a.jpg"][f"fraction_{name}"]) == pytest.approx((expected == i).mean(), abs=1e-6)
    coco = _check_coco(out)
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["a.jpg", "c.jpg", "sub/b.jpg"]
    assert not (out / PARTS_FOLDER).exists()  # the record files are folded in and removed

    # --instances: one annotation per connected component, still the same pixels as the PNG.
    inst = tmp_path / "inst"
    assert main(_class_args(episode, sharp_ckpt, inst, "--instances", "--format", "coco")) == 0
    assert len(_check_coco(inst).dataset["annotations"]) >= len(coco.dataset["annotations"])
    # --format png: label maps and manifest, no JSON.
    plain = tmp_path / "plain"
    assert main(_class_args(episode, sharp_ckpt, plain, "--format", "png")) == 0
    assert (plain / "c_mask.png").is_file() and not (plain / "annotations.json").exists()


def test_resume_completes_the_json_without_duplicate_ids(
    sharp_ckpt: Path, episode: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_regions: None
) -> None:
    out = tmp_path / "out"
    write = segment_classes.ClassOutputs.write
    done: list[str] = []

    def killed_after_one(self, q, image, result) -> None:
        if done:
            raise KeyboardInterrupt  # Ctrl-C during the second query
        write(self, q, image, result)
        done.append(q.rel)

    monkeypatch.setattr(segment_classes.ClassOutputs, "write", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(_class_args(episode, sharp_ckpt, out))
    monkeypatch.setattr(segment_classes.ClassOutputs, "write", write)  # the run goes on unharmed
    first = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in first["images"]] == done
    statuses = {Path(r["query"]).name: r["status"] for r in _manifest(out / "manifest.csv")}
    assert sorted(statuses.values()) == ["not run", "not run", "written"]

    # The rest, then a query added since: the JSON is completed, earlier ids kept, none repeated.
    assert main(_class_args(episode, sharp_ckpt, out)) == 0
    shutil.copy(episode["extra"], episode["root"] / "q" / "d.jpg")
    try:
        assert main(_class_args(episode, sharp_ckpt, out)) == 0
    finally:
        (episode["root"] / "q" / "d.jpg").unlink()
    coco = _check_coco(out)
    images = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    assert sorted(images) == ["a.jpg", "c.jpg", "d.jpg", "sub/b.jpg"]
    assert images[done[0]] == first["images"][0]["id"]
    statuses = {Path(r["query"]).name: r["status"] for r in _manifest(out / "manifest.csv")}
    assert statuses == {"a.jpg": "exists", "b.jpg": "exists", "c.jpg": "exists", "d.jpg": "written"}

    # A kill -9 leaves a record file (maybe with a torn last line): the next run folds it in.
    parts = out / PARTS_FOLDER
    parts.mkdir()
    record = {"query": "x", "file_name": "e.jpg", "status": "written", "width": 2, "height": 1}
    (parts / "rank0.jsonl").write_text(json.dumps({**record, "annotations": []}) + '\n{"query": "tor')
    assert main(_class_args(episode, sharp_ckpt, out)) == 0
    names = [im["file_name"] for im in json.loads((out / "annotations.json").read_text())["images"]]
    assert sorted(names) == ["a.jpg", "c.jpg", "d.jpg", "e.jpg", "sub/b.jpg"] and not parts.exists()


def test_supports_folder_and_class_index_masks_give_the_same_labels(
    sharp_ckpt: Path, episode: dict, tmp_path: Path
) -> None:
    reference = tmp_path / "ref"
    assert main(_class_args(episode, sharp_ckpt, reference, "--format", "png")) == 0
    # --supports DIR: a folder per class with binary masks (sorted folder names = NAMES).
    tree = tmp_path / "supports"
    for name, img, mask in episode["supports"]:
        (tree / name).mkdir(parents=True)
        shutil.copy(img, tree / name / "s.jpg")
        shutil.copy(mask, tree / name / "s_mask.png")
    # Class-index masks with --class-names: each support image's mask holds its class's value.
    indexed = []
    for value, (_, img, mask) in enumerate(episode["supports"], start=1):
        index = tmp_path / f"index{value}_mask.png"
        Image.fromarray((np.array(Image.open(mask)) > 0).astype(np.uint8) * value).save(index)
        indexed += ["--support", str(img), str(index)]
    where = ["--queries", str(episode["root"] / "q"), "--device", "cpu", "--format", "png"]
    runs = {
        "tree": ["--supports", str(tree)],
        "index": [*indexed, "--class-names", *NAMES],
    }
    for name, supports in runs.items():
        out = tmp_path / name
        assert main(["--ckpt", str(sharp_ckpt), *supports, *where, "--out", str(out)]) == 0
        for rel in ("a_mask.png", "c_mask.png", "sub/b_mask.png"):
            assert np.array_equal(np.array(Image.open(out / rel)), np.array(Image.open(reference / rel))), (
                name
            )


def test_bad_inputs_one_line_exit_2(sharp_ckpt: Path, episode: dict, tmp_path: Path, capsys) -> None:
    (_, img, mask), _ = episode["supports"]
    index = tmp_path / "index_mask.png"
    values = (np.array(Image.open(mask)) > 0).astype(np.uint8)
    values[:2, :2] = 2  # a second class in the corner
    Image.fromarray(values).save(index)
    (tmp_path / "classes.txt").write_text("left\n")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 600, 3), np.uint8)).save(big)
    dot = np.zeros((600, 600), np.uint8)
    dot[301, 301] = 255  # one pixel: gone once resized to the 64-px model input
    Image.fromarray(dot).save(tmp_path / "big_mask.png")
    base = ["--ckpt", str(sharp_ckpt), "--queries", str(episode["root"] / "q"), "--device", "cpu"]
    classes_txt = str(tmp_path / "classes.txt")
    cases = {
        "no support": (["--support", str(img), str(index), "--class-names", "left", "right", "up"],
                       "class 'up' has no support"),
        "twice": (["--support", str(img), str(index), "--class-names", "left", "left"],
                  "class name 'left' is given twice"),
        "not in classes.txt": (["--support", str(img), str(index), "--classes-file", classes_txt],
                               "holds the value 2, which is no class"),
        "empty after resize": (["--class", "left", str(img), str(mask), "--class", "tiny", str(big),
                                str(tmp_path / "big_mask.png")], "marks no object pixel once resized"),
        "coco without classes": (["--support", str(img), str(mask), "--format", "coco"],
                                 "--format need(s) named classes"),
        "other classes in OUT": (["--class", "left", str(img), str(mask)], "has the classes ['x'], this run"),
    }  # fmt: skip
    (tmp_path / f"out{len(cases) - 1}").mkdir()
    other = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / f"out{len(cases) - 1}" / "annotations.json").write_text(json.dumps(other))
    for k, (args, message) in enumerate(cases.values()):
        out = tmp_path / f"out{k}"
        assert main([*base, *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list(out.rglob("*_mask.png"))  # stopped before any query


def _coco_by_name(out: Path) -> dict[str, list[dict]]:
    """Each image's annotations without their ids (which depend on the writing order)."""
    data = json.loads((out / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    by_name: dict[str, list[dict]] = {n: [] for n in names.values()}
    for ann in data["annotations"]:
        by_name[names[ann["image_id"]]].append({k: v for k, v in ann.items() if k not in ("id", "image_id")})
    return by_name


def _two_processes(args: list[str], cwd: Path) -> str:
    """``python -m fewshot_seg.cli segment ... --devices 2`` on the CPU (gloo), as DDP launches it."""
    return run_two_processes(["segment", *args, "--devices", "2"], cwd)


@pytest.mark.slow
def test_two_processes_write_each_query_once_and_equal_one(
    sharp_ckpt: Path, episode: dict, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_class_args(episode, sharp_ckpt, one, "--instances")) == 0
    stdout = _two_processes(_class_args(episode, sharp_ckpt, two, "--instances"), tmp_path)
    # 3 queries over 2 ranks: 2 + 1, none written twice (each rank's record lines are counted).
    assert "written per process: rank 0: 2, rank 1: 1; written twice: 0" in stdout
    for rel in ("a_mask.png", "c_mask.png", "sub/b_mask.png"):
        assert np.array_equal(np.array(Image.open(two / rel)), np.array(Image.open(one / rel))), rel
    assert _coco_by_name(two) == _coco_by_name(one)
    assert (two / "manifest.csv").read_text() == (one / "manifest.csv").read_text()
    _check_coco(two)  # unique ids, each annToMask union equal to its PNG
    assert not (two / PARTS_FOLDER).exists()

    # Resume with 2 processes after a kill -9 (rank 1's record file left, torn last line): the record is
    # folded in, only the query added since is segmented, ids stay unique.
    (two / PARTS_FOLDER).mkdir()
    record = {"query": "x", "file_name": "e.jpg", "status": "written", "width": 2, "height": 1}
    (two / PARTS_FOLDER / "rank1.jsonl").write_text(json.dumps({**record, "annotations": []}) + '\n{"qu')
    shutil.copy(episode["extra"], episode["root"] / "q" / "d.jpg")
    try:
        stdout = _two_processes(_class_args(episode, sharp_ckpt, two, "--instances"), tmp_path)
    finally:
        (episode["root"] / "q" / "d.jpg").unlink()
    assert "1 label map(s) written, 3 already there" in stdout
    data = json.loads((two / "annotations.json").read_text())
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    images = sorted(data["images"], key=lambda im: im["id"])
    names = [im["file_name"] for im in images]  # rank 0's queries first, then rank 1's, then the resumed
    assert sorted(names[:3]) == ["a.jpg", "c.jpg", "sub/b.jpg"] and names[3:] == ["e.jpg", "d.jpg"]
    assert not (two / PARTS_FOLDER).exists()


def test_class_run_refuses_a_folder_another_run_made(
    sharp_ckpt: Path, episode: dict, tmp_path: Path, capsys
) -> None:
    """The class flow records its run (segment_run.json) as the 1-class form does: other supports for the
    same class names are refused without --overwrite, and a 1-class run cannot add masks to the folder."""
    out = tmp_path / "out"
    assert main(_class_args(episode, sharp_ckpt, out)) == 0
    record = json.loads((out / "segment_run.json").read_text())
    assert list(record["classes"]) == list(NAMES)
    (name_a, img_a, mask_a), (name_b, img_b, mask_b) = episode["supports"][:2]
    swapped = dict(episode, supports=[(name_a, img_b, mask_b), (name_b, img_a, mask_a)])
    capsys.readouterr()
    assert main(_class_args(swapped, sharp_ckpt, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs: classes" in err[0] and "--overwrite" in err[0]
    assert main(_class_args(swapped, sharp_ckpt, out, "--overwrite")) == 0
    single = ["--ckpt", str(sharp_ckpt), "--support", str(img_a), str(mask_a)]
    assert main([*single, "--queries", str(episode["root"] / "q"), "--out", str(out), "--device", "cpu"]) == 2
