"""``fewshot-seg serve`` without a model: who may send requests (``serve_guard``), what a request may cost
(``serve_request``: pixel limits read from the header, never decoded), its files (``serve_files``: zips
capped, the folder of a killed server removed by the next one), and its answer for several classes."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import zipfile
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from png_bombs import png_header

from fewshot_seg.errors import DatasetError
from fewshot_seg.label_maps import class_colors
from fewshot_seg.multiclass import ClassSegmentation, EncodedClasses
from fewshot_seg.tools.serve import SegmentApp
from fewshot_seg.tools.serve_files import LOCK_FILE, ZipStore, remove_stale
from fewshot_seg.tools.serve_guard import Guard, Refused, content_length
from fewshot_seg.tools.serve_request import PixelBudget, RequestError, decode_image
from fewshot_seg.user_images import check_pixels
from fewshot_seg.visualize import class_overlay


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ------------------------------------------------------------------------------------------ guard
def test_loopback_guard_refuses_foreign_hosts_origins_and_types() -> None:
    guard = Guard.for_address("127.0.0.1", 7860)
    ok = {"Host": "127.0.0.1:7860", "Content-Type": "application/json", "Origin": "http://127.0.0.1:7860"}
    guard.check("POST", "/api/segment", ok)
    guard.check("GET", "/", {"Host": "localhost:7860"})
    guard.check("POST", "/api/segment", {**ok, "Host": "[::1]:7860", "Origin": "http://[::1]:7860"})
    assert guard.token is None
    refusals = [
        ({**ok, "Host": "evil.example:7860", "Origin": "http://evil.example:7860"}, 403, "Host"),  # rebinding
        ({**ok, "Host": "127.0.0.1:8000"}, 403, "Host"),  # another port
        ({**ok, "Origin": "http://evil.example"}, 403, "cross-site"),
        ({**ok, "Origin": "http://127.0.0.1:9999"}, 403, "cross-site"),  # another local page
        ({**ok, "Content-Type": "text/plain;charset=UTF-8"}, 415, "application/json"),  # no-cors fetch
        ({**ok, "Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        ({"Host": "127.0.0.1:7860"}, 415, "application/json"),
    ]
    for headers, status, words in refusals:
        with pytest.raises(Refused, match=words) as err:
            guard.check("POST", "/api/segment", headers)
        assert err.value.status == status


def test_non_loopback_guard_requires_the_token() -> None:
    guard = Guard.for_address("0.0.0.0", 7860)
    assert guard.token and len(guard.token) >= 32
    assert guard.url("0.0.0.0", 7860) == f"http://127.0.0.1:7860/?token={guard.token}"
    headers = {"Host": "myhost:7860", "Content-Type": "application/json"}
    with pytest.raises(Refused, match="token") as err:
        guard.check("POST", "/api/segment", headers)
    assert err.value.status == HTTPStatus.FORBIDDEN
    with pytest.raises(Refused, match="token"):
        guard.check("GET", "/?token=wrong", headers)
    guard.check("GET", f"/?token={guard.token}", headers)  # any Host name on a wildcard address
    guard.check("POST", "/api/segment", {**headers, "X-Fewshot-Token": guard.token})
    named = Guard.for_address("192.168.1.5", 80)
    named.check("GET", f"/?token={named.token}", {"Host": "192.168.1.5:80"})
    with pytest.raises(Refused, match="Host"):
        named.check("GET", f"/?token={named.token}", {"Host": "evil.example:80"})


@pytest.mark.parametrize(
    ("value", "status"),
    [(None, HTTPStatus.LENGTH_REQUIRED), ("-1", HTTPStatus.BAD_REQUEST), ("abc", HTTPStatus.BAD_REQUEST)],
)
def test_content_length_must_be_a_non_negative_integer(value: str | None, status: HTTPStatus) -> None:
    headers = {} if value is None else {"Content-Length": value}
    with pytest.raises(Refused) as err:
        content_length(headers)
    assert err.value.status == status
    assert content_length({"Content-Length": "12"}) == 12


# ------------------------------------------------------------------------------------------ pixels
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; we refuse
def test_pixel_limit_is_read_from_the_header_before_decoding() -> None:
    budget = PixelBudget(per_image=50_000_000, total=300_000_000)
    # 13,000 x 13,000 = 169 MP: under PIL's own bomb error (179 MP) it would be decoded (~170 MB here).
    with pytest.raises(
        RequestError, match=r"query 1 is 13000x13000 = 169.0 MP, more than the limit of 50.0 MP"
    ):
        decode_image(data_url(png_header(13_000, 13_000)), "query 1", budget)
    # 20,000 x 20,000 = 400 MP: PIL's DecompressionBombError (not an OSError) becomes the same kind of answer.
    with pytest.raises(RequestError, match="query 2"):
        decode_image(data_url(png_header(20_000, 20_000)), "query 2", PixelBudget(10**9, 10**9))
    with pytest.raises(DatasetError, match=r"photo\.png is 20x10 = 0\.0 MP, more than the limit"):
        check_pixels(Image.new("L", (20, 10)), "photo.png", 199)
    check_pixels(Image.new("L", (20, 10)), "photo.png", 200)


def test_pixel_budget_of_a_request() -> None:
    budget = PixelBudget(per_image=100, total=250)
    small = data_url(png_header(10, 10, rows=10))
    assert decode_image(small, "query 1", budget).size == (10, 10)
    decode_image(small, "query 2", budget)
    with pytest.raises(RequestError, match=r"query 3: the request's images add up to more than"):
        decode_image(small, "query 3", budget)


# ------------------------------------------------------------------------------------------ files
def test_zips_are_capped(tmp_path: Path) -> None:
    store = ZipStore(tmp_path, limit=2)
    for token in ("a", "b", "c"):
        store.new_path(token).write_bytes(b"zip")
        store.add(token)
    assert store.get("a") is None and not (tmp_path / "a.zip").exists()
    assert store.get("c") == tmp_path / "c.zip" and sorted(p.name for p in tmp_path.iterdir()) == [
        "b.zip",
        "c.zip",
    ]


def test_folder_of_a_killed_server_is_removed_by_the_next(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from fewshot_seg.tools.serve_files import WorkFolder; "
        "w = WorkFolder(Path(sys.argv[1])); (w.path / 'x.zip').write_bytes(b'masks'); "
        "print(w.path, flush=True); time.sleep(60)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    killed, alive = (Path(p.stdout.readline().strip()) for p in procs)
    try:
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=20)
        assert (killed / "x.zip").exists()  # kill -9 leaves it ...
        assert remove_stale(tmp_path) == [killed]  # ... and the next server removes it, not the live one
        assert not killed.exists() and (alive / LOCK_FILE).exists()
    finally:
        procs[1].kill()
        procs[1].wait(timeout=20)
    assert remove_stale(tmp_path) == [alive]


# ------------------------------------------------------------------------------------------ classes
class _KnownLabels:
    """A stand-in for the Segmenter that labels every query with a known map (left half class 1, bottom
    right class 2): the tiny test model labels nothing, so the page's class outputs are checked here."""

    def encode_classes(self, triples: list) -> EncodedClasses:
        names = list(dict.fromkeys(name for name, _, _ in triples))
        shots = [SimpleNamespace(shot=sum(n == name for n, _, _ in triples)) for name in names]
        return EncodedClasses(names=tuple(names), supports=tuple(shots), image_size=32)

    def segment_class_arrays(self, images: list[np.ndarray], classes: EncodedClasses) -> list:
        out = []
        for image in images:
            h, w = image.shape[:2]
            labels = np.zeros((h, w), np.uint8)
            labels[:, : w // 2] = 1
            labels[h // 2 :, w // 2 :] = 2
            out.append(ClassSegmentation(labels, np.full((h, w), 0.75, np.float32)))
        return out


def test_classes_answer_zip_and_annotations(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    def png(array: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return data_url(buf.getvalue())

    image, mask = np.full((20, 30, 3), 200, np.uint8), np.zeros((20, 30), np.uint8)
    mask[5:15, 5:15] = 255
    support = {"image": png(image), "mask": png(mask)}
    request = {
        "supports": [
            {**support, "class": "scratch"},
            {**support, "class": " dent "},
            {**support, "class": "scratch"},
        ],
        "queries": [{"name": "q.jpg", "image": png(image)}, {"name": "q.jpg", "image": png(image)}],
    }
    app = SegmentApp(_KnownLabels(), ZipStore(tmp_path), 2**20, 10**6, 10**7)  # type: ignore[arg-type]
    answer = app.segment(request)
    colors = class_colors()
    assert answer["classes"] == [
        {"name": "scratch", "value": 1, "color": list(colors[1]), "shot": 2},
        {"name": "dent", "value": 2, "color": list(colors[2]), "shot": 1},
    ]
    first = answer["results"][0]
    assert [r["name"] for r in answer["results"]] == ["q", "q-2"]
    assert first["fractions"] == {"scratch": 0.5, "dent": 0.25}
    overlay = np.array(Image.open(io.BytesIO(base64.b64decode(first["overlay"].split(",", 1)[1]))))
    expected = class_overlay(image, _KnownLabels().segment_class_arrays([image], None)[0].labels)  # type: ignore[arg-type]
    assert np.array_equal(overlay, np.array(expected)) and not np.array_equal(overlay[0, 0], image[0, 0])
    token = answer["zip"].removeprefix("/download/").removesuffix(".zip")
    archive = zipfile.ZipFile(ZipStore(tmp_path).new_path(token))
    assert sorted(archive.namelist()) == ["annotations.json", "q-2_mask.png", "q_mask.png"]
    labels = np.array(Image.open(archive.open("q_mask.png")))
    assert Image.open(archive.open("q_mask.png")).mode == "P" and np.unique(labels).tolist() == [0, 1, 2]
    (tmp_path / "annotations.json").write_bytes(archive.read("annotations.json"))
    coco = COCO(str(tmp_path / "annotations.json"))
    assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == ["q.jpg", "q-2.jpg"]
    for value in (1, 2):
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[1], catIds=[value]))
        assert np.array_equal(coco.annToMask(ann).astype(bool), labels == value) and ann["score"] == 0.75


class _Counting:
    """A stand-in for the Segmenter (one class) that counts the queries it segments."""

    def __init__(self) -> None:
        self.segmented = 0

    def encode_supports(self, images: list, masks: list) -> SimpleNamespace:
        return SimpleNamespace(shot=len(images))

    def segment_arrays(self, images: list[np.ndarray], supports: object) -> list[np.ndarray]:
        self.segmented += len(images)
        return [np.zeros(image.shape[:2], np.uint8) for image in images]


def test_queries_are_decoded_one_at_a_time(tmp_path: Path) -> None:
    """Query 1 is segmented before query 2 is decoded (before, every query was decoded first)."""
    small = data_url(png_header(10, 10, rows=10))
    request = {
        "supports": [{"image": small, "mask": data_url(_square_mask())}],
        "queries": [
            {"name": "a.png", "image": small},
            {"name": "bomb.png", "image": data_url(png_header(20_000, 20_000))},
        ],
    }
    counting = _Counting()
    app = SegmentApp(counting, ZipStore(tmp_path), 2**20, 10**6, 10**7)  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="query 2"):
        app.segment(request)
    assert counting.segmented == 1


def _square_mask() -> bytes:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:8, 2:8] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()
