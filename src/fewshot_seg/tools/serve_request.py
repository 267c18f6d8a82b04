"""A ``/api/segment`` request of ``fewshot-seg serve`` read safely: its shape checked, its images decoded
one at a time under a pixel limit per image and a pixel budget per request.

Request: ``{"supports": [{"image", "mask", "class"?}], "queries": [{"name", "image"}]}``, images as
base64 data URLs. Each image's size is read from its header and refused (a JSON 400 naming it) before it
is decoded when it is over the limit or the request's budget, so a small PNG that expands to gigabytes
(a decompression bomb) costs nothing. The queries are decoded lazily (:meth:`PageRequest.queries`), one
at a time, as the server segments them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fewshot_seg.errors import DatasetError
from fewshot_seg.user_images import check_pixels, read_user_image, read_user_mask

MAX_SUPPORTS = 5
MAX_QUERIES = 100
DEFAULT_CLASS = "object"
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.S)


class RequestError(ValueError):
    """A request the page (or a client) got wrong; answered with 400 and the message."""


@dataclass
class PixelBudget:
    """The pixel limits of one request: ``per_image`` for any image, ``total`` for all of them together."""

    per_image: int
    total: int
    used: int = 0

    def take(self, image: Image.Image, what: str) -> None:
        """Count ``image`` (from its header); raise :class:`RequestError` naming it when over a limit."""
        try:
            check_pixels(image, what, self.per_image)
        except DatasetError as err:
            raise RequestError(str(err)) from err
        self.used += image.size[0] * image.size[1]
        if self.used > self.total:
            raise RequestError(
                f"{what}: the request's images add up to more than {self.total / 1e6:.1f} MP; send fewer or "
                "smaller images per request"
            )


def decode_image(value: Any, what: str, budget: PixelBudget) -> Image.Image:
    """A data URL -> a loaded PIL image, refused from its header when over ``budget``."""
    if not isinstance(value, str) or not (m := _DATA_URL.fullmatch(value)):
        raise RequestError(f"{what}: expected an image as a base64 data URL")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(m.group(1), validate=True)))
        budget.take(im, what)
        im.load()
    except Image.DecompressionBombError as err:  # past PIL's own limit: raised by Image.open itself
        raise RequestError(f"{what}: refused as a decompression bomb ({err})") from err
    except (OSError, ValueError, SyntaxError, binascii.Error) as err:
        if isinstance(err, RequestError):
            raise
        raise RequestError(f"{what}: not an image PIL reads ({err})") from err
    return im


@dataclass
class Support:
    """One support read: ``image [H, W, 3]`` uint8, ``mask [H, W]`` in {0, 1, 255}, its class name."""

    image: np.ndarray
    mask: np.ndarray
    class_name: str


class PageRequest:
    """A checked request; supports read at once, queries decoded one at a time."""

    def __init__(self, request: Any, budget: PixelBudget) -> None:
        if not isinstance(request, dict):
            raise RequestError("expected a JSON object")
        supports, queries = request.get("supports") or [], request.get("queries") or []
        if not isinstance(supports, list) or not 1 <= len(supports) <= MAX_SUPPORTS:
            raise RequestError(f"give 1 to {MAX_SUPPORTS} supports (image + mask)")
        if not isinstance(queries, list) or not 1 <= len(queries) <= MAX_QUERIES:
            raise RequestError(f"give 1 to {MAX_QUERIES} query images")
        for i, q in enumerate(queries):
            if not isinstance(q, dict):
                raise RequestError(f"query {i + 1}: expected an object with name and image")
        self.budget = budget
        self._queries = queries
        self.supports = [self._support(i, s) for i, s in enumerate(supports)]
        self.query_names = [q.get("name") for q in queries]

    def _support(self, i: int, s: Any) -> Support:
        name = f"support {i + 1}"
        if not isinstance(s, dict) or not s.get("mask"):
            raise RequestError(f"{name} has no mask: paint the object or upload a mask")
        class_name = s.get("class")
        if class_name is None or (isinstance(class_name, str) and not class_name.strip()):
            class_name = DEFAULT_CLASS
        if not isinstance(class_name, str):
            raise RequestError(f"{name}: the class name must be text")
        image = read_user_image(decode_image(s.get("image"), name, self.budget), name)
        mask = read_user_mask(decode_image(s["mask"], f"{name} mask", self.budget), f"{name} mask")
        return Support(image, mask, class_name.strip())

    @property
    def class_names(self) -> list[str]:
        """The distinct class names in the order the supports first give them (label value i = name i)."""
        return list(dict.fromkeys(s.class_name for s in self.supports))

    def queries(self) -> Iterator[np.ndarray]:
        """Each query as ``[H, W, 3]`` uint8 RGB, decoded only when asked for (one held at a time)."""
        for i, q in enumerate(self._queries):
            what = f"query {i + 1}"
            yield read_user_image(decode_image(q.get("image"), what, self.budget), what)


__all__ = [
    "DEFAULT_CLASS",
    "MAX_QUERIES",
    "MAX_SUPPORTS",
    "PageRequest",
    "PixelBudget",
    "RequestError",
    "Support",
    "decode_image",
]
