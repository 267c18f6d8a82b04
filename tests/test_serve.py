"""``fewshot-seg serve``: the whole page flow in a real headless Chromium (Debian's chromium + chromedriver).

Selenium drives the browser through ``/usr/bin/chromedriver`` given explicitly, so it never downloads a
browser or a driver. Without Chromium installed (a developer machine) the browser test is skipped with
the reason; ``.ci/run`` installs it, so CI always runs it. ``FEWSHOT_SERVE_SCREENSHOT=<png>`` also saves
the screenshot there (the tiny test model's; the one in docs/ shows the demo model by the same flow).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_seg import Segmenter

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(stage2_ckpt: Path):
    """``fewshot-seg serve`` on a free loopback port, as a user starts it; stopped with SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fewshot_seg.cli", "serve", "--ckpt", str(stage2_ckpt), "--port", "0",
           "--device", "cpu", "--max-upload-mb", "2"]  # fmt: skip
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


def _post(url: str, payload: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "api/segment", data=payload, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_api_errors_and_limits(server: dict, tmp_path: Path) -> None:
    status, body = _post(server["url"], b'{"supports": [], "queries": []}')
    assert status == 400 and "1 to 5 supports" in body["error"]
    status, body = _post(
        server["url"], json.dumps({"supports": [{"image": "x", "mask": "y"}], "queries": [{}]}).encode()
    )
    assert status == 400 and "support 1: expected an image as a base64 data URL" in body["error"]
    # Over --max-upload-mb 2: refused from the header, before the body is read.
    conn = http.client.HTTPConnection(
        *server["url"].removeprefix("http://").strip("/").split(":"), timeout=10
    )
    conn.putrequest("POST", "/api/segment")
    conn.putheader("Content-Length", str(3 * 2**20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "larger than 2 MB" in json.load(response)["error"]
    conn.close()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(server["url"] + "download/../../etc/passwd", timeout=10)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_in_a_real_browser(server: dict, stage2_ckpt: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    files = _files(tmp_path)
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
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server["url"])
        driver.find_element(By.ID, "support-image").send_keys(str(files["support"]))
        mask_input = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".support-mask-input")))
        mask_input.send_keys(str(files["mask"]))
        wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".card.support").get_attribute("data-mask") == "file"
        )
        driver.find_element(By.ID, "query-images").send_keys(str(files["query"]))
        wait.until(ec.text_to_be_present_in_element((By.ID, "queries-list"), "query.png"))
        driver.find_element(By.ID, "run").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done: 1 query, 1-shot"))
        overlay = driver.find_element(By.CSS_SELECTOR, ".result-overlay")
        assert overlay.get_attribute("naturalWidth") == "70"
        href = driver.find_element(By.CSS_SELECTOR, ".result-mask").get_attribute("href")
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("FEWSHOT_SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["FEWSHOT_SERVE_SCREENSHOT"])
        zip_href = driver.find_element(By.ID, "download-zip").get_attribute("href")
    finally:
        driver.quit()
    page_mask = np.array(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))) // 255
    seg = Segmenter.from_checkpoint(stage2_ckpt, device="cpu")
    (expected,) = seg.segment([files["query"]], seg.encode_supports([files["support"]], [files["mask"]]))
    assert np.array_equal(page_mask, expected)  # the page's mask is the API's
    with urllib.request.urlopen(zip_href, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/zip"
    assert any(server["workdir"].glob("*.zip"))

    # SIGTERM stops it cleanly and removes its working folder.
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "stopped" in proc.stdout.read() and not server["workdir"].exists()
