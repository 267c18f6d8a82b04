"""``fewshot-seg serve``: the API's refusals over real sockets, and the whole page flow in a real headless
Chromium (Debian's chromium + chromedriver): one class, two classes, an upload too large, and a second
page on another port that tries to drive the server cross-site.

Selenium drives the browser through ``/usr/bin/chromedriver`` given explicitly, so it never downloads a
browser or a driver. Without Chromium installed (a developer machine) the browser test is skipped with
the reason; ``.ci/run`` installs it, so CI always runs it. ``FEWSHOT_SERVE_SCREENSHOT=<png>`` also saves
the screenshot there (the tiny test model's; the one in docs/ shows the demo model by the same flow).
"""

from __future__ import annotations

import base64
import functools
import http.client
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from png_bombs import png_header

from fewshot_seg import Segmenter

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(stage2_ckpt: Path):
    """``fewshot-seg serve`` on a free loopback port, as a user starts it; stopped with SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fewshot_seg.cli", "serve", "--ckpt", str(stage2_ckpt), "--port", "0",
           "--device", "cpu", "--max-upload-mb", "2", "--max-image-mp", "1", "--max-request-mp", "3",
           "--request-timeout", "3", "--max-connections", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
    url = line.split()[2]
    workdir = Path(line.rsplit("working folder ", 1)[1].strip())
    yield {"url": url, "proc": proc, "workdir": workdir}
    if proc.poll() is None:
        proc.kill()


def _files(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(11)
    paths = {"support": tmp / "support.jpg", "mask": tmp / "support_mask.png", "query": tmp / "query.png"}
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(paths["support"])
    mask = np.zeros((60, 80), np.uint8)
    mask[10:45, 20:60] = 255
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(paths["query"])
    return paths


def _post(url: str, payload: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "api/segment", data=payload, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _raw(url: str, request: bytes, timeout: float = 20) -> tuple[int, dict]:
    """Send raw bytes (headers as a hostile or broken client writes them) and read the JSON answer."""
    host, port = url.removeprefix("http://").strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data, "the server closed the connection without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _valid_request(files: dict[str, Path]) -> bytes:
    support = {"image": _data_url(files["support"]), "mask": _data_url(files["mask"])}
    return json.dumps(
        {"supports": [support], "queries": [{"name": "q.png", "image": _data_url(files["query"])}]}
    ).encode()


def test_api_errors_and_limits(server: dict, tmp_path: Path) -> None:
    status, body = _post(server["url"], b'{"supports": [], "queries": []}')
    assert status == 400 and "1 to 5 supports" in body["error"]
    status, body = _post(
        server["url"], json.dumps({"supports": [{"image": "x", "mask": "y"}], "queries": [{}]}).encode()
    )
    assert status == 400 and "support 1: expected an image as a base64 data URL" in body["error"]
    # Over --max-upload-mb 2: refused from the header. A body up to 4x the limit is read and dropped first
    # so that a browser receives the answer; a larger one is not read at all.
    for length, body in ((3 * 2**20, b"x" * (3 * 2**20)), (100 * 2**20, b"")):
        conn = http.client.HTTPConnection(
            *server["url"].removeprefix("http://").strip("/").split(":"), timeout=10
        )
        conn.putrequest("POST", "/api/segment")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders(body)
        response = conn.getresponse()
        assert response.status == 413 and "larger than 2 MB" in json.load(response)["error"]
        conn.close()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(server["url"] + "download/../../etc/passwd", timeout=10)


def test_requests_from_other_sites_are_refused(server: dict, tmp_path: Path) -> None:
    """A cross-site no-cors POST arrives as text/plain with a foreign Origin; DNS rebinding as a foreign
    Host. Both reached the handler before (the answer was "give 1 to 5 supports")."""
    url, payload = server["url"], _valid_request(_files(tmp_path))
    port = url.rsplit(":", 1)[1].strip("/")
    zips = set(server["workdir"].glob("*.zip"))
    status, body = _post(
        url, payload, {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}
    )
    assert status == 403 and "cross-site request from Origin 'http://evil.example'" in body["error"]
    status, body = _post(url, payload, {"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 415 and "application/json only" in body["error"]
    status, body = _post(url, payload, {"Host": f"evil.example:{port}"})
    assert status == 403 and "Host 'evil.example:" in body["error"]
    with pytest.raises(urllib.error.HTTPError, match="403"):  # the page itself is not served to it either
        urllib.request.urlopen(urllib.request.Request(url, headers={"Host": "evil.example"}), timeout=10)
    assert set(server["workdir"].glob("*.zip")) == zips  # nothing was segmented
    status, body = _post(url, payload, {"Origin": url.rstrip("/")})  # the page's own request
    assert status == 200 and body["results"][0]["name"] == "q"


def test_malformed_requests_get_an_answer(server: dict) -> None:
    url = server["url"]
    host = url.removeprefix("http://").strip("/")
    start = f"POST /api/segment HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    status, body = _raw(url, (start + "\r\n").encode() + b'{"supports": []}')
    assert status == 411 and "Content-Length" in body["error"]
    status, body = _raw(url, (start + "Content-Length: -1\r\n\r\n").encode() + b"{}")
    assert status == 400 and "Content-Length '-1'" in body["error"]
    status, body = _raw(url, (start + "Content-Length: abc\r\n\r\n").encode())
    assert status == 400 and "Content-Length 'abc'" in body["error"]
    status, body = _raw(url, (start + "Content-Length: 4\r\n\r\n").encode() + b'"\xff\xfe"')
    assert status == 400 and "not UTF-8" in body["error"]


def test_large_images_are_refused_before_decoding(server: dict, tmp_path: Path) -> None:
    """--max-image-mp 1 and --max-request-mp 3 (the fixture); a bomb past PIL's own limit is a JSON 400."""
    files = _files(tmp_path)
    request = json.loads(_valid_request(files))
    big = tmp_path / "big.png"
    Image.new("L", (1500, 1000)).save(big)  # 1.5 MP, a few KB
    request["queries"] = [{"name": "big.png", "image": _data_url(big)}]
    status, body = _post(server["url"], json.dumps(request).encode())
    assert status == 400 and "query 1 is 1500x1000 = 1.5 MP, more than the limit of 1.0 MP" in body["error"]
    # 20,000 x 20,000 (400 MP): PIL raises DecompressionBombError, which escaped before (no answer at all).
    bomb = base64.b64encode(png_header(20_000, 20_000)).decode()
    request["queries"] = [{"name": "bomb.png", "image": "data:image/png;base64," + bomb}]
    status, body = _post(server["url"], json.dumps(request).encode())
    assert status == 400 and "query 1" in body["error"]
    near = tmp_path / "near.png"
    Image.new("L", (1000, 990)).save(near)  # 0.99 MP each; the 4th is over the budget (supports count)
    request["queries"] = [{"name": f"n{i}.png", "image": _data_url(near)} for i in range(4)]
    status, body = _post(server["url"], json.dumps(request).encode())
    assert status == 400 and "query 4: the request's images add up to more than 3.0 MP" in body["error"]


def test_slow_clients_time_out_and_connections_are_bounded(server: dict) -> None:
    """--request-timeout 3 --max-connections 3 (the fixture): silent clients are dropped, a 4th request
    meanwhile is answered 503 at once."""
    host, port = server["url"].removeprefix("http://").strip("/").split(":")
    silent = [socket.create_connection((host, int(port)), timeout=30) for _ in range(3)]
    try:
        for s in silent:
            s.sendall(b"POST /api/segment HTTP/1.0\r\n")  # ... and never the rest
        time.sleep(0.5)
        status, body = _raw(server["url"], b"GET / HTTP/1.0\r\n\r\n")
        assert status == 503 and "busy" in body["error"]
        start = time.monotonic()
        for s in silent:
            assert s.recv(1024) == b""  # closed by the server, not by us
        assert time.monotonic() - start < 15
    finally:
        for s in silent:
            s.close()
    time.sleep(0.5)
    status, body = _post(server["url"], b'{"supports": [], "queries": []}')
    assert status == 400  # slots free again


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the page tests of this module."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _add_support(driver, wait, image: Path, mask: Path, class_name: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".card.support"))
    driver.find_element(By.ID, "support-image").send_keys(str(image))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.support")) == before + 1)
    card = driver.find_elements(By.CSS_SELECTOR, ".card.support")[-1]
    card.find_element(By.CSS_SELECTOR, ".support-mask-input").send_keys(str(mask))
    wait.until(lambda d: card.get_attribute("data-mask") == "file")
    if class_name is not None:
        field = card.find_element(By.CSS_SELECTOR, ".support-class")
        field.clear()
        field.send_keys(class_name)


def _run(driver, wait, query: Path, done: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.find_element(By.ID, "query-images").send_keys(str(query))
    wait.until(ec.text_to_be_present_in_element((By.ID, "queries-list"), query.name))
    driver.find_element(By.ID, "run").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), done))


def _png_of(href: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))


def test_page_in_a_real_browser(server: dict, browser, stage2_ckpt: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files, driver = _files(tmp_path), browser
    wait = WebDriverWait(driver, 60)
    driver.get(server["url"])
    _add_support(driver, wait, files["support"], files["mask"])
    _run(driver, wait, files["query"], "done: 1 query, 1-shot")
    overlay = driver.find_element(By.CSS_SELECTOR, ".result-overlay")
    assert overlay.get_attribute("naturalWidth") == "70"
    href = driver.find_element(By.CSS_SELECTOR, ".result-mask").get_attribute("href")
    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("FEWSHOT_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["FEWSHOT_SERVE_SCREENSHOT"])
    zip_href = driver.find_element(By.ID, "download-zip").get_attribute("href")
    assert driver.find_element(By.ID, "legend").text == ""  # one class: no legend, masks as before
    page_mask = np.array(_png_of(href)) // 255
    seg = Segmenter.from_checkpoint(stage2_ckpt, device="cpu")
    (expected,) = seg.segment([files["query"]], seg.encode_supports([files["support"]], [files["mask"]]))
    assert np.array_equal(page_mask, expected)  # the page's mask is the API's
    with urllib.request.urlopen(zip_href, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/zip"
    assert any(server["workdir"].glob("*.zip"))


def test_page_shows_the_servers_refusals(server: dict, browser, tmp_path: Path) -> None:
    """Every error the page can get shows its message: an upload over --max-upload-mb (413), and a 400 MP
    PNG of a few bytes, which before got no answer at all (the page showed "Failed to fetch")."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files, driver = _files(tmp_path), browser
    wait = WebDriverWait(driver, 60)
    driver.get(server["url"])
    _add_support(driver, wait, files["support"], files["mask"])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))
    _run(driver, wait, bomb, "query 1: refused as a decompression bomb")
    assert driver.find_element(By.ID, "status").get_attribute("class") == "error"
    big = tmp_path / "big.png"  # added to the selection (a multiple file input): the request is > 2 MB
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big)
    _run(driver, wait, big, "upload larger than 2 MB")


def test_page_with_two_classes(server: dict, browser, stage2_ckpt: Path, tmp_path: Path) -> None:
    """Two supports of two class names: legend, class colours, label PNG and annotations.json."""
    from pycocotools.coco import COCO
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from fewshot_seg.label_maps import class_colors

    files, driver = _files(tmp_path), browser
    mask2 = tmp_path / "support2_mask.png"
    m = np.zeros((60, 80), np.uint8)
    m[40:58, 5:30] = 255
    Image.fromarray(m).save(mask2)
    wait = WebDriverWait(driver, 60)
    driver.get(server["url"])
    _add_support(driver, wait, files["support"], files["mask"], "scratch")
    _add_support(driver, wait, files["support"], mask2, "dent")
    colors = class_colors()
    swatches = [
        e.value_of_css_property("background-color")
        for e in driver.find_elements(By.CSS_SELECTOR, ".card.support .swatch")
    ]
    assert swatches == [f"rgba({c[0]}, {c[1]}, {c[2]}, 1)" for c in colors[1:3]]  # a new name, a new colour
    _run(driver, wait, files["query"], "done: 1 query, 2 classes")
    items = driver.find_elements(By.CSS_SELECTOR, "#legend .legend-item")
    assert [i.text for i in items] == ["scratch", "dent"]
    assert [i.get_attribute("data-color") for i in items] == [",".join(map(str, c)) for c in colors[1:3]]
    legend_colors = [
        i.find_element(By.CSS_SELECTOR, ".swatch").value_of_css_property("background-color") for i in items
    ]
    assert legend_colors == swatches
    labels_png = _png_of(driver.find_element(By.CSS_SELECTOR, ".result-mask").get_attribute("href"))
    assert labels_png.mode == "P" and labels_png.getpalette()[3:9] == [*colors[1], *colors[2]]
    zip_href = driver.find_element(By.ID, "download-zip").get_attribute("href")
    shot = tmp_path / "classes.png"
    driver.set_window_size(1200, 1450)  # supports, legend and result in one picture
    driver.save_screenshot(str(shot))
    driver.set_window_size(1200, 900)
    if os.environ.get("FEWSHOT_SERVE_CLASSES_SCREENSHOT"):
        shutil.copy(shot, os.environ["FEWSHOT_SERVE_CLASSES_SCREENSHOT"])

    seg = Segmenter.from_checkpoint(stage2_ckpt, device="cpu")
    classes = seg.encode_classes(
        {"scratch": [(files["support"], files["mask"])], "dent": [(files["support"], mask2)]}
    )
    (expected,) = seg.segment_classes([files["query"]], classes)
    assert np.array_equal(np.array(labels_png), expected.labels)  # the page's labels are the API's
    with urllib.request.urlopen(zip_href, timeout=10) as r:
        archive = zipfile.ZipFile(io.BytesIO(r.read()))
    assert sorted(archive.namelist()) == ["annotations.json", "query_mask.png"]
    assert np.array_equal(np.array(Image.open(archive.open("query_mask.png"))), expected.labels)
    (tmp_path / "annotations.json").write_bytes(archive.read("annotations.json"))
    coco = COCO(str(tmp_path / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["scratch", "dent"]
    (image,) = coco.loadImgs(coco.getImgIds())
    assert (image["file_name"], image["width"], image["height"]) == ("query.png", 70, 50)
    for value in (1, 2):
        anns = coco.loadAnns(coco.getAnnIds(catIds=[value]))
        union = np.zeros((50, 70), bool)
        for ann in anns:
            union |= coco.annToMask(ann).astype(bool)
        assert np.array_equal(union, expected.labels == value)


_CROSS_SITE_PAGE = """<!doctype html><html><body><script>
fetch(%s, {method: "POST", mode: "no-cors", body: %s})
  .then(() => { document.title = "sent"; }, (e) => { document.title = "failed " + e; });
</script></body></html>"""


def test_cross_site_page_cannot_drive_the_server(server: dict, browser, tmp_path: Path) -> None:
    """A second page, served on another port, posts a valid request to the server with a no-cors fetch
    (text/plain, no preflight) as any site the user has open could: nothing is segmented."""
    from selenium.webdriver.support.ui import WebDriverWait

    page = _CROSS_SITE_PAGE % (
        json.dumps(server["url"] + "api/segment"),
        json.dumps(_valid_request(_files(tmp_path)).decode()),
    )
    (tmp_path / "index.html").write_text(page)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    zips = set(server["workdir"].glob("*.zip"))
    try:
        browser.get(f"http://127.0.0.1:{other.server_address[1]}/index.html")
        WebDriverWait(browser, 60).until(lambda d: d.title.startswith(("sent", "failed")))
    finally:
        other.shutdown()
        other.server_close()
    assert browser.title == "sent"  # the request went out (its answer is opaque to that page) ...
    time.sleep(1)
    assert set(server["workdir"].glob("*.zip")) == zips  # ... and was refused: nothing segmented


def test_sigterm_stops_and_cleans(server: dict, browser, tmp_path: Path) -> None:
    """SIGTERM stops it cleanly and removes its working folder (the last test of the shared server); the
    page, still open, then says that the server does not answer."""
    from selenium.webdriver.support.ui import WebDriverWait

    files, wait = _files(tmp_path), WebDriverWait(browser, 60)
    browser.get(server["url"])
    _add_support(browser, wait, files["support"], files["mask"])
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "stopped" in proc.stdout.read() and not server["workdir"].exists()
    _run(browser, wait, files["query"], "the server did not answer")


def test_sighup_cleans_and_the_next_server_removes_a_killed_ones_folder(
    stage2_ckpt: Path, tmp_path: Path
) -> None:
    """kill -9 leaves the folder (nothing can run then): the next server removes it; SIGHUP (a closed
    terminal) cleans like SIGTERM. The second server listens on all interfaces: it warns and requires the
    token it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "fewshot_seg.cli", "serve", "--ckpt", str(stage2_ckpt), "--port", "0",
           "--device", "cpu"]  # fmt: skip

    def start(*extra: str) -> tuple[subprocess.Popen, str, Path]:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        line = proc.stdout.readline()
        assert line.startswith("serving on"), line + proc.stderr.read()
        return proc, line.split()[2], Path(line.rsplit("working folder ", 1)[1].strip())

    first, _, first_dir = start()
    first.kill()
    first.wait(timeout=20)
    assert first_dir.exists() and first_dir.parent == tmp_path
    second, url, second_dir = start("--host", "0.0.0.0")
    try:
        assert not first_dir.exists()
        assert "?token=" in url
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(url.split("?")[0], timeout=10)
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"<title>fewshot-seg" in r.read()
    finally:
        second.send_signal(signal.SIGHUP)
        assert second.wait(timeout=20) == 0
    err = second.stderr.read()
    assert not second_dir.exists() and f"removed {first_dir}" in err
    assert "warning: listening on 0.0.0.0, not this machine only" in err
