"""``fewshot-seg serve``: a local page to try a trained model: paint or upload up to 5 supports (each of a
named class), upload queries, see each query's overlay and download the masks.

    fewshot-seg serve --ckpt stage2.ckpt [--host 127.0.0.1] [--port 7860] [--device auto]

Python's own HTTP server and one self-contained HTML page (``serve_page.html``: no script or style from
the network; why not Gradio: docs/inference.md). The page posts the images as data URLs to
``/api/segment``; the server segments them with :class:`fewshot_seg.Segmenter` (so the masks are the
API's) and answers with overlays and masks as PNG data URLs, plus a zip kept in its own temporary folder
(``serve_files``), the only folder it serves files from.

One class (every support of the same class name, or none given): 0/255 masks, as ``segment`` writes.
Several class names: ``Segmenter.segment_classes``; class-index palette PNGs, overlays in the class
colours, and ``annotations.json`` (COCO, RLE) in the zip.

Who may drive it (``serve_guard``): the loopback Host names with its port, same-origin, JSON only; a token
on a non-loopback ``--host``. What a request may cost (``serve_request``): ``--max-upload-mb``, a pixel
limit per image and a budget per request, checked before decoding; a socket timeout and a bound on
concurrent requests. Every refusal is a JSON ``{"error": ...}`` the page shows.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import secrets
import signal
import socket
import sys
import threading
import traceback
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from fewshot_seg.errors import DatasetError
from fewshot_seg.label_maps import class_colors, label_image
from fewshot_seg.outputs import MASK_SUFFIX, OutputNames
from fewshot_seg.segmenter import Segmenter
from fewshot_seg.tools.common import USER_ERRORS, ToolError, load_segmenter, model_tool_parser
from fewshot_seg.tools.serve_files import WorkFolder, ZipStore
from fewshot_seg.tools.serve_guard import Guard, Refused, content_length
from fewshot_seg.tools.serve_request import PageRequest, PixelBudget, RequestError
from fewshot_seg.visualize import class_overlay, mask_image, prediction_overlay

_TOKEN = re.compile(r"/download/([0-9a-f]{32})\.zip")
DRAIN_FACTOR = 4
"""A body up to this many times ``--max-upload-mb`` is read and dropped before the 413 answer, so that a
browser gets the message instead of a reset connection; a larger one is not read at all."""


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _safe_name(name: Any, index: int) -> str:
    """A file name for the zip: the upload's base name (extension kept), reduced to safe characters."""
    base = Path(str(name or f"query{index}.png")).name
    safe = re.sub(r"[^\w.-]+", "_", base).strip("._")
    return safe if Path(safe).stem else f"query{index}.png"


class SegmentApp:
    """The model and the server's zips; one forward pass at a time (the model is not shared).

    Args:
        max_image_pixels, max_request_pixels: the pixel limit of one image and the budget of one request.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        zips: ZipStore,
        max_upload_bytes: int,
        max_image_pixels: int,
        max_request_pixels: int,
    ) -> None:
        self.segmenter = segmenter
        self.zips = zips
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self._lock = threading.Lock()

    def segment(self, request: Any) -> dict[str, Any]:
        """``{"supports": [{"image", "mask", "class"?}], "queries": [{"name", "image"}]}`` -> overlays,
        masks (or label maps), the zip's address; queries decoded and segmented one at a time."""
        req = PageRequest(request, PixelBudget(self.max_image_pixels, self.max_request_pixels))
        token = secrets.token_hex(16)
        uploads = [_safe_name(name, i) for i, name in enumerate(req.query_names)]
        with zipfile.ZipFile(self.zips.new_path(token), "w", zipfile.ZIP_DEFLATED) as zf:
            if len(req.class_names) > 1:
                answer = self._segment_classes(req, uploads, zf)
            else:
                answer = self._segment_one(req, uploads, zf)
        self.zips.add(token)
        return {**answer, "zip": f"/download/{token}.zip"}

    def _segment_one(self, req: PageRequest, uploads: list[str], zf: zipfile.ZipFile) -> dict[str, Any]:
        with self._lock:
            encoded = self.segmenter.encode_supports(
                [s.image for s in req.supports], [s.mask for s in req.supports]
            )
        names, out = OutputNames(uploads), []
        for upload, image in zip(uploads, req.queries()):
            with self._lock:
                (mask,) = self.segmenter.segment_arrays([image], encoded)
            name = names.stem(upload)
            mask_png = _png_bytes(mask_image(mask))
            zf.writestr(f"{name}{MASK_SUFFIX}", mask_png)
            out.append(
                {
                    "name": name,
                    "overlay": _data_url(_png_bytes(prediction_overlay(image, mask))),
                    "mask": _data_url(mask_png),
                    "foreground_fraction": float(mask.mean()),
                    "size": [int(mask.shape[1]), int(mask.shape[0])],
                }
            )
        return {"results": out, "shot": encoded.shot}

    def _segment_classes(self, req: PageRequest, uploads: list[str], zf: zipfile.ZipFile) -> dict[str, Any]:
        # Imported here: pycocotools is needed only for several classes, and importing the tools must not
        # load it (tests/test_inference_imports.py).
        from fewshot_seg.coco_export import ANNOTATIONS_FILE, CocoAnnotations

        with self._lock:
            classes = self.segmenter.encode_classes([(s.class_name, s.image, s.mask) for s in req.supports])
        names, out = OutputNames(uploads), []
        coco = CocoAnnotations(classes.names)
        for upload, image in zip(uploads, req.queries()):
            with self._lock:
                (result,) = self.segmenter.segment_class_arrays([image], classes)
            name = names.stem(upload)
            labels_png = _png_bytes(label_image(result.labels))
            zf.writestr(f"{name}{MASK_SUFFIX}", labels_png)
            # COCO file_name: the upload's name; a repeated upload gets its unique stem + extension.
            file_name = upload if upload not in coco else name + Path(upload).suffix
            coco.add(file_name, result.labels, result.confidence)
            out.append(
                {
                    "name": name,
                    "overlay": _data_url(_png_bytes(class_overlay(image, result.labels))),
                    "mask": _data_url(labels_png),
                    "fractions": dict(zip(classes.names, result.fractions(len(classes)))),
                    "foreground_fraction": float((result.labels != 0).mean()),
                    "size": [int(result.labels.shape[1]), int(result.labels.shape[0])],
                }
            )
        zf.writestr(ANNOTATIONS_FILE, json.dumps(coco.to_dict()))
        colors = class_colors()
        return {
            "results": out,
            "classes": [
                {"name": n, "value": i, "color": list(colors[i]), "shot": s.shot}
                for i, (n, s) in enumerate(zip(classes.names, classes.supports), start=1)
            ],
            "shot": max(s.shot for s in classes.supports),
        }


def make_handler(app: SegmentApp, guard: Guard, timeout: float) -> type[BaseHTTPRequestHandler]:
    """The request handler: every request passes ``guard`` first; a slow client is dropped after
    ``timeout`` seconds without data."""
    page = files("fewshot_seg.tools").joinpath("serve_page.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "fewshot-seg"

        def setup(self) -> None:
            self.timeout = timeout  # socketserver applies it to the connection (reads and writes)
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the console; errors are answered to the page

        def _send(self, status: HTTPStatus, body: bytes, kind: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")  # no other page may frame it (clickjacking)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _guarded(self, method: str) -> bool:
            try:
                guard.check(method, self.path, self.headers)
            except Refused as err:
                self._refuse(err)
                return False
            return True

        def _refuse(self, err: Refused) -> None:
            """Answer ``err`` and close; a body of a valid, moderate length is read and dropped first, so
            that the client receives the answer (closing on unread data resets the connection)."""
            with contextlib.suppress(Refused):
                self._drain(content_length(self.headers))
            self.close_connection = True
            self._json(err.status, {"error": str(err)})

        def _drain(self, length: int) -> None:
            if length <= DRAIN_FACTOR * app.max_upload_bytes:
                left = length
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                    left -= len(chunk)

        def do_GET(self) -> None:
            if not self._guarded("GET"):
                return
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif (m := _TOKEN.fullmatch(path)) and (zip_path := app.zips.get(m.group(1))) is not None:
                body = zip_path.read_bytes()
                disposition = {"Content-Disposition": 'attachment; filename="masks.zip"'}
                self._send(HTTPStatus.OK, body, "application/zip", disposition)
            elif m:
                expired = "this zip has expired (only the latest are kept): run again"
                self._json(HTTPStatus.GONE, {"error": expired})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

        def do_POST(self) -> None:
            if not self._guarded("POST"):
                return
            if urlsplit(self.path).path != "/api/segment":
                self._refuse(Refused(HTTPStatus.NOT_FOUND, "not found"))
                return
            try:
                length = content_length(self.headers)
            except Refused as err:
                self._refuse(err)
                return
            if length > app.max_upload_bytes:
                limit = app.max_upload_bytes / 2**20
                self._refuse(Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload larger than {limit:g} MB"))
                return
            try:
                request = json.loads(self.rfile.read(length).decode("utf-8") or "{}")
                self._json(HTTPStatus.OK, app.segment(request))
            except UnicodeDecodeError as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not UTF-8 text: {err}"})
            except json.JSONDecodeError as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON: {err}"})
            except (RequestError, DatasetError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            except TimeoutError:
                raise  # the client stopped sending: the connection is dropped (http.server handles it)
            except Exception as err:  # nothing silent: the page shows it, the console keeps the traceback
                traceback.print_exc()
                message = f"server error: {type(err).__name__}: {err}"
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """A threading server that runs at most ``max_connections`` requests at once; the next one is
    answered 503 at once instead of queueing a thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": "the server is busy with other requests: try again"}).encode()
            with contextlib.suppress(OSError):  # the client is gone already
                # What has arrived is read first: closing on unread data resets the connection, and the
                # client would lose the answer.
                request.settimeout(0.2)
                request.recv(1 << 16)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_tool_parser(
        "fewshot-seg serve",
        "A local page: segment images with a stage-2 model from painted or uploaded supports.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; any other address prints a "
        "warning and requires the token printed with the URL)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    parser.add_argument(
        "--max-upload-mb", type=float, default=64, help="largest request accepted, in MB (default 64)"
    )
    parser.add_argument(
        "--max-image-mp",
        type=float,
        default=50,
        help="largest image accepted, in megapixels, checked before decoding (default 50)",
    )
    parser.add_argument(
        "--max-request-mp",
        type=float,
        default=300,
        help="most pixels of all images of one request together, in megapixels (default 300)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=30,
        help="seconds a client may stay silent before its connection is dropped (default 30)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=8,
        help="requests served at once; more are answered 503 (default 8)",
    )
    return parser.parse_args(argv)


def _check_limits(args: argparse.Namespace) -> None:
    for option, value in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--max-image-mp", args.max_image_mp),
        ("--max-request-mp", args.max_request_mp),
        ("--request-timeout", args.request_timeout),
        ("--max-connections", args.max_connections),
    ):
        if not value > 0:
            raise ToolError(f"{option} must be positive, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C, SIGTERM or SIGHUP (exit 0); a bad checkpoint, option or port: one line, exit 2."""
    args = parse_args(argv)
    try:
        _check_limits(args)
        segmenter = load_segmenter(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = WorkFolder()
    for stale in work.removed_stale:
        print(f"removed {stale}, left by a server that was killed", file=sys.stderr, flush=True)
    try:
        app = SegmentApp(
            segmenter,
            ZipStore(work.path),
            int(args.max_upload_mb * 2**20),
            int(args.max_image_mp * 1e6),
            int(args.max_request_mp * 1e6),
        )
        try:
            server = BoundedServer((args.host, args.port), None, args.max_connections)  # type: ignore[arg-type]
        except OSError as err:
            print(f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
            return 2
        port = server.server_address[1]
        # The guard needs the port actually bound (--port 0), hence the handler set after binding.
        guard = Guard.for_address(args.host, port)
        server.RequestHandlerClass = make_handler(app, guard, args.request_timeout)

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)
        if guard.token:
            print(
                f"warning: listening on {args.host}, not this machine only: anyone who can reach it and has "
                "the token in the address below can use the model",
                file=sys.stderr,
                flush=True,
            )
        url = guard.url(args.host, port)
        print(f"serving on {url} (Ctrl-C to stop); working folder {work.path}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        print("stopped", flush=True)
        return 0
    finally:
        work.remove()


if __name__ == "__main__":
    raise SystemExit(main())
