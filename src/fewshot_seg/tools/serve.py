"""``fewshot-seg serve``: a local page to try a trained model: paint or upload up to 5 supports, upload
queries, see each query's overlay and download the masks.

    fewshot-seg serve --ckpt stage2.ckpt [--host 127.0.0.1] [--port 7860] [--device auto]

Python's own HTTP server and one self-contained HTML page (``serve_page.html``: no script or style from
the network; why not Gradio: docs/inference.md). The page posts the images as data URLs to
``/api/segment``; the server segments them with :class:`fewshot_seg.Segmenter` (so the masks are the
API's) and answers with overlays and masks as PNG data URLs, plus a zip kept in its own temporary folder,
which is the only folder it serves files from and is deleted when it stops (Ctrl-C or SIGTERM).

Loopback only unless ``--host`` says otherwise; a request larger than ``--max-upload-mb`` is refused
before it is read.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

from PIL import Image

from fewshot_seg.errors import DatasetError
from fewshot_seg.outputs import MASK_SUFFIX, OutputNames
from fewshot_seg.segmenter import Segmenter
from fewshot_seg.tools.common import USER_ERRORS, load_segmenter, model_tool_parser
from fewshot_seg.user_images import read_user_image, read_user_mask
from fewshot_seg.visualize import mask_image, prediction_overlay

MAX_SUPPORTS = 5
MAX_QUERIES = 100
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.S)
_TOKEN = re.compile(r"/download/([0-9a-f]{32})\.zip")


class RequestError(ValueError):
    """A request the page (or a client) got wrong; answered with 400 and the message."""


def _decode_image(value: Any, what: str) -> Image.Image:
    if not isinstance(value, str) or not (m := _DATA_URL.fullmatch(value)):
        raise RequestError(f"{what}: expected an image as a base64 data URL")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(m.group(1), validate=True)))
        im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise RequestError(f"{what}: not an image PIL reads ({err})") from err
    return im


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _safe_name(name: Any, index: int) -> str:
    """A file name for the zip: the upload's base name (extension kept), reduced to safe characters."""
    base = Path(str(name or f"query{index}.png")).name
    safe = re.sub(r"[^\w.-]+", "_", base).strip("._")
    return safe if Path(safe).stem else f"query{index}.png"


class SegmentApp:
    """The model and the server's temporary folder; one segmentation at a time (the model is not shared)."""

    def __init__(self, segmenter: Segmenter, workdir: Path, max_upload_bytes: int) -> None:
        self.segmenter = segmenter
        self.workdir = workdir
        self.max_upload_bytes = max_upload_bytes
        self.zips: dict[str, Path] = {}
        self._lock = threading.Lock()

    def segment(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"supports": [{"image", "mask"}], "queries": [{"name", "image"}]}`` -> overlays, masks, zip."""
        supports, queries = request.get("supports") or [], request.get("queries") or []
        if not isinstance(supports, list) or not 1 <= len(supports) <= MAX_SUPPORTS:
            raise RequestError(f"give 1 to {MAX_SUPPORTS} supports (image + mask)")
        if not isinstance(queries, list) or not 1 <= len(queries) <= MAX_QUERIES:
            raise RequestError(f"give 1 to {MAX_QUERIES} query images")
        images, masks = [], []
        for i, s in enumerate(supports):
            if not isinstance(s, dict) or not s.get("mask"):
                raise RequestError(f"support {i + 1} has no mask: paint the object or upload a mask")
            name = f"support {i + 1}"
            images.append(read_user_image(_decode_image(s.get("image"), name), name))
            masks.append(read_user_mask(_decode_image(s["mask"], f"{name} mask"), f"{name} mask"))
        query_images = [
            read_user_image(_decode_image(q.get("image") if isinstance(q, dict) else None, f"query {i + 1}"))
            for i, q in enumerate(queries)
        ]
        with self._lock:
            encoded = self.segmenter.encode_supports(images, masks)
            results = self.segmenter.segment(query_images, encoded)
        token = secrets.token_hex(16)
        zip_path = self.workdir / f"{token}.zip"
        uploads = [_safe_name(q.get("name"), i) for i, q in enumerate(queries)]
        names, out = OutputNames(uploads), []
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for upload, image, mask in zip(uploads, query_images, results):
                name = names.stem(upload)
                mask_png = mask_image(mask)
                buf = io.BytesIO()
                mask_png.save(buf, format="PNG")
                zf.writestr(f"{name}{MASK_SUFFIX}", buf.getvalue())
                out.append(
                    {
                        "name": name,
                        "overlay": _png_data_url(prediction_overlay(image, mask)),
                        "mask": _png_data_url(mask_png),
                        "foreground_fraction": float(mask.mean()),
                        "size": [int(mask.shape[1]), int(mask.shape[0])],
                    }
                )
        self.zips[token] = zip_path
        return {"results": out, "zip": f"/download/{token}.zip", "shot": encoded.shot}


def make_handler(app: SegmentApp) -> type[BaseHTTPRequestHandler]:
    page = files("fewshot_seg.tools").joinpath("serve_page.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "fewshot-seg"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the console; errors are answered to the page

        def _send(self, status: HTTPStatus, body: bytes, kind: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif (m := _TOKEN.fullmatch(self.path)) and m.group(1) in app.zips:
                body = app.zips[m.group(1)].read_bytes()
                disposition = {"Content-Disposition": 'attachment; filename="masks.zip"'}
                self._send(HTTPStatus.OK, body, "application/zip", disposition)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/api/segment":
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > app.max_upload_bytes:
                limit = app.max_upload_bytes // 2**20
                self.close_connection = True  # the body is not read: the connection cannot be reused
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"upload larger than {limit} MB"})
                return
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise RequestError("expected a JSON object")
                self._json(HTTPStatus.OK, app.segment(request))
            except (RequestError, DatasetError, json.JSONDecodeError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_tool_parser(
        "fewshot-seg serve",
        "A local page: segment images with a stage-2 model from painted or uploaded supports.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    parser.add_argument(
        "--max-upload-mb", type=int, default=64, help="largest request accepted, in MB (default 64)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM (exit 0); a bad checkpoint or port: one line, exit 2."""
    args = parse_args(argv)
    try:
        segmenter = load_segmenter(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="fewshot-seg-serve-"))
    try:
        app = SegmentApp(segmenter, workdir, args.max_upload_mb * 2**20)
        try:
            server = ThreadingHTTPServer((args.host, args.port), make_handler(app))
        except OSError as err:
            print(f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
            return 2
        server.daemon_threads = True

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        host, port = server.server_address[:2]
        print(f"serving on http://{host}:{port}/ (Ctrl-C to stop); working folder {workdir}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        print("stopped", flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
