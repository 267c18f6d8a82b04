"""Reading a user's own images and masks (folder episodes, ``Segmenter``, ``fewshot-seg segment|serve``).

Benchmarks read their files exactly as the published loaders do (``source.read_rgb``); a user's photos
and masks get two more rules, one meaning for one file everywhere:

* **Orientation**: the EXIF orientation tag is applied, so an image is segmented as a viewer shows it
  (a phone photo stored sideways comes back as a mask of its displayed size).
* **Mask convention** (:data:`MASK_CONVENTION`, :func:`mask_rule`): a mask whose values are only
  {0, 255} or only {0, 1} (or a bool array) is binary: the non-zero value is the object. A mask with
  more values is read by what it looks like. Values that look like class ids (at most
  :data:`MAX_CLASS_VALUES` distinct values, and no smooth ramp between neighbours) follow the VOC
  convention: 0 background, 255 ignore (never scored, never a support pixel), any other value the
  object. Anything else (an anti-aliased brush, a JPEG's ringing) is greyscale: thresholded at 128.
  Colour masks (RGB) are read as their greyscale (``L``) values first; a palette image by its colours
  (unless its palette is the VOC colour map, whose indices are class ids); an image whose colour is
  uniform and whose alpha channel varies by its alpha.
* **Bit depth**: 16-bit greyscale images (PNG ``I;16``) are scaled to 8 bits (65535 -> 255), then
  used as grey RGB; 32-bit integer images are read as 16-bit when their values fit; float images
  are refused.

:class:`Letterbox` is the model input of the ``spec`` protocol (long side to the input size, padded to a
square), in OpenCV alone: ``datamodules.transforms.TestTransform`` uses it too, so the ``Segmenter``
prepares an image as a DataModule does without importing the data layer or albumentations.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from fewshot_seg.episode import IGNORE_INDEX, PIXEL_MEAN
from fewshot_seg.errors import DatasetError, reading

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""A path, a PIL image or an ``[H, W, 3]`` uint8 RGB array (greyscale ``[H, W]`` arrays are accepted)."""

MaskInput = str | os.PathLike | Image.Image | np.ndarray
"""A path, a PIL image or an ``[H, W]`` array (bool, or integers 0..255)."""

MASK_CONVENTION = (
    "a mask with only the values {0, 255} or {0, 1} is binary (object = the non-zero value); one whose "
    "values look like class ids (few values, no smooth ramps) is VOC-style: 0 = background, 255 = ignore, "
    "any other value = the object; any other greyscale mask (anti-aliased, JPEG) is object where >= 128"
)
MAX_CLASS_VALUES = 32
"""More distinct values than this are no class-id mask (VOC has 21 classes and 255)."""
RAMP_FRACTION = 0.05
"""A class-id mask jumps from one value to another; a mask where more than this fraction of the
pixels at a value change lie strictly between their two neighbours (a ramp) is greyscale."""
THRESHOLD = 128

RULE_BINARY_255 = "binary 0/255"
RULE_BINARY_1 = "binary 0/1"
RULE_CLASS_IDS = "class ids (VOC: 0 background, 255 ignore, other values the object)"
RULE_GREYSCALE = "greyscale (anti-aliased or JPEG): object where >= 128"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def describe(source: object, what: str) -> str:
    """``what`` and, for a file, its path: the name error messages use."""
    return f"{what} {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else what


def _open(source: str | os.PathLike, what: str) -> Image.Image:
    with reading(source, what), Image.open(source) as im:
        im.load()
        return ImageOps.exif_transpose(im) or im


def _rgb_from_pil(im: Image.Image, name: str) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DatasetError(
                f"{name} is a 32-bit integer image with values outside 0..65535; save it as 8-bit RGB"
            )
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # 16-bit -> 8-bit, rounded
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        raise DatasetError(f"{name} is a floating-point image (mode F); save it as 8-bit RGB")
    return np.asarray(im.convert("RGB"))


def read_user_image(source: ImageInput, what: str = "image") -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB as displayed (EXIF orientation applied, 16-bit greyscale scaled).

    Raises:
        DatasetError: naming the file (or ``what``) when it is missing, unreadable, empty (0 pixels) or of
            a refused kind.
    """
    name = describe(source, what)
    image = _rgb(source, what, name)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DatasetError(f"{name} is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    return image


def _rgb(source: ImageInput, what: str, name: str) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        return _rgb_from_pil(_open(source, what), name)
    if isinstance(source, Image.Image):
        return _rgb_from_pil(ImageOps.exif_transpose(source) or source, name)
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise DatasetError(f"{name} has shape {list(source.shape)}; expected [H, W, 3] (RGB)")
        if arr.dtype != np.uint8:
            raise DatasetError(f"{name} has dtype {arr.dtype}; expected uint8 RGB values 0..255")
        return np.ascontiguousarray(arr[..., :3])
    raise DatasetError(f"{what}: expected a path, a PIL image or a numpy array, got {type(source).__name__}")


def _ramp_fraction(m: np.ndarray) -> float:
    """Of the pixels next to a value change, the fraction strictly between both neighbours (row or column)."""
    ramps = np.zeros(m.shape, dtype=bool)  # comparisons only: uint8 needs no widening
    changes = np.zeros(m.shape, dtype=bool)
    for axis in (0, 1):
        if m.shape[axis] < 3:
            continue
        a = np.moveaxis(m, axis, 0)
        before, mid, after = a[:-2], a[1:-1], a[2:]
        ramp = ((before < mid) & (mid < after)) | ((before > mid) & (mid > after))
        change = (before != mid) | (mid != after)
        np.moveaxis(ramps, axis, 0)[1:-1] |= ramp
        np.moveaxis(changes, axis, 0)[1:-1] |= change
    return float(ramps.sum()) / max(1, int(changes.sum()))


def mask_rule(values: np.ndarray) -> str:
    """Which reading of :data:`MASK_CONVENTION` uint8 mask values ``[H, W]`` get (a ``RULE_*`` name)."""
    counts = np.bincount(values.ravel(), minlength=256)
    present = set(np.flatnonzero(counts).tolist())
    if present <= {0, 255}:
        return RULE_BINARY_255
    if present <= {0, 1}:
        return RULE_BINARY_1
    if len(present) <= MAX_CLASS_VALUES and _ramp_fraction(values) <= RAMP_FRACTION:
        return RULE_CLASS_IDS
    return RULE_GREYSCALE


def mask_and_rule(values: np.ndarray, name: str = "mask") -> tuple[np.ndarray, str]:
    """(``[H, W]`` uint8 in {0, 1, 255}, the rule used) from mask values, by :data:`MASK_CONVENTION`."""
    if values.ndim != 2:
        raise DatasetError(f"{name} has shape {list(values.shape)}; expected [H, W]")
    if values.dtype == bool:
        return values.astype(np.uint8), RULE_BINARY_1
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise DatasetError(f"{name} has dtype {values.dtype}; expected bool or integers 0..255")
    integral = np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values))
    if values.size and (values.min() < 0 or values.max() > 255 or not integral):
        raise DatasetError(f"{name} holds values outside the integers 0..255 ({MASK_CONVENTION})")
    m = values.astype(np.uint8, copy=False)
    rule = mask_rule(m)
    if rule == RULE_GREYSCALE:
        return (m >= THRESHOLD).astype(np.uint8), rule
    out = (m != 0).astype(np.uint8)
    if rule == RULE_CLASS_IDS:
        out[m == IGNORE_INDEX] = IGNORE_INDEX
    return out, rule


def mask_from_values(values: np.ndarray, name: str = "mask") -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1, 255} from mask values, by :data:`MASK_CONVENTION`."""
    return mask_and_rule(values, name)[0]


def voc_colormap(n: int = 256) -> np.ndarray:
    """``[n, 3]`` uint8: the PASCAL VOC palette (index i's colour from the bits of i, as the VOC devkit)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_VOC_COLOURS = voc_colormap()


def _palette_values(im: Image.Image) -> np.ndarray:
    """A palette image's values: its indices when they are class ids (the VOC colour map, or a grey ramp
    i -> (i, i, i)), else its colours' greyscale (PIL's ``quantize`` puts any colour at any index)."""
    indices = np.asarray(im)
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    if used.size and used.max() < len(palette):
        colours = palette[used]
        grey_ramp = np.repeat(used[:, None], 3, axis=1)
        if np.array_equal(colours, _VOC_COLOURS[used]) or np.array_equal(colours, grey_ramp):
            return indices
    return _alpha_or_grey(im.convert("RGBA"))


def _alpha_or_grey(im: Image.Image) -> np.ndarray:
    """The alpha channel when it varies and the colour does not (an object only in alpha), else ``L``."""
    if im.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(im.getchannel("A"))
        grey = np.asarray(im.convert("L"))
        if alpha.min() != alpha.max() and grey.min() == grey.max():
            return alpha
    return np.asarray(im.convert("L"))


def _pil_mask_values(im: Image.Image) -> np.ndarray:
    if im.mode == "1":
        return np.asarray(im, dtype=bool)
    if im.mode == "P":
        return _palette_values(im)
    if im.mode == "L" or im.mode in _SIXTEEN_BIT or im.mode == "I":
        return np.asarray(im)
    return _alpha_or_grey(im)


def read_user_mask_and_rule(source: MaskInput, what: str = "mask") -> tuple[np.ndarray, str]:
    """(``[H, W]`` uint8 in {0, 1, 255}: 1 = object, 255 = ignore; the rule of :func:`mask_rule` used)."""
    name = describe(source, what)
    if isinstance(source, (str, os.PathLike)):
        source = _open(source, what)
    elif isinstance(source, Image.Image):
        source = ImageOps.exif_transpose(source) or source
    if isinstance(source, Image.Image):
        return mask_and_rule(_pil_mask_values(source), name)
    if isinstance(source, np.ndarray):
        return mask_and_rule(source, name)
    raise DatasetError(f"{what}: expected a path, a PIL image or a numpy array, got {type(source).__name__}")


def read_user_mask(source: MaskInput, what: str = "mask") -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1, 255} (1 = object, 255 = ignore) from a mask file, PIL image or array."""
    return read_user_mask_and_rule(source, what)[0]


def check_pixels(image: Image.Image, name: str, limit: int) -> None:
    """Refuse an image of more than ``limit`` pixels from its header, before it is decoded.

    PIL only warns up to 179 MP (a 13,000 x 13,000 PNG of a few hundred KB decodes to ~500 MB) and raises
    its own ``DecompressionBombError`` beyond; call this between ``Image.open`` and ``load``.
    """
    width, height = image.size
    if width * height > limit:
        raise DatasetError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} MP, more than the limit of "
            f"{limit / 1e6:.1f} MP"
        )


def check_same_size(mask: np.ndarray, image: np.ndarray, mask_name: str, image_name: str) -> None:
    """Refuse a mask whose size differs from its image's, naming both (width x height)."""
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{mask_name} is {mask.shape[1]}x{mask.shape[0]} but {image_name} is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)"
        )


def require_object(mask: np.ndarray, name: str) -> None:
    """Refuse a support mask without any object pixel (it would make every prediction meaningless)."""
    if not (mask == 1).any():
        raise DatasetError(f"{name} marks no object pixel ({MASK_CONVENTION})")


def require_object_resized(label: np.ndarray, name: str, size: int) -> None:
    """Refuse a support mask whose object vanished when resized to the model input (a thin object in a
    large photo): :func:`require_object` saw it at full size."""
    if not (label == 1).any():
        raise DatasetError(
            f"{name} marks no object pixel once resized to the model input ({size} px long side): mark a "
            "larger region or use a larger image size"
        )


def image_extensions() -> frozenset[str]:
    """File extensions PIL can open here (``.jpg``, ``.png``, ``.webp``, ...), lower case."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_mask_file(path: Path) -> bool:
    """``<name>_mask.<ext>``: a mask beside its image, never an image of its own."""
    return path.stem.endswith("_mask")


def _walk(folder: Path) -> list[Path]:
    """Every entry under ``folder``, symbolic links to folders followed, each real folder visited once."""
    seen: set[str] = set()
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root, name) for name in files]
    return found


def scan_images(
    folder: Path, recursive: bool = False, exclude: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(images, unsupported files) of ``folder``, sorted: the one folder scanner of the folder DataModule
    and ``fewshot-seg segment``.

    Hidden files (``.name``: editor and OS leftovers, our own ``.tmp`` files) and masks (``*_mask.*``) are
    neither; so is everything under ``exclude`` (an output folder inside the input folder). A file whose
    extension PIL does not open is unsupported. ``recursive`` follows symbolically linked sub-folders
    (each real folder once: a link back up is no loop).
    """
    exts = image_extensions()
    skip = exclude.resolve() if exclude is not None else None
    images, unsupported = [], []
    for p in sorted(_walk(folder) if recursive else folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or is_mask_file(p):
            continue
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        (images if p.suffix.lower() in exts else unsupported).append(p)
    return images, unsupported


class Letterbox:
    """Resize so the long side is ``size`` (aspect ratio kept), then pad bottom/right to ``size x size``.

    The image is resized with OpenCV's bilinear interpolation and padded with the mean pixel (0 once
    normalised), the label nearest-neighbour and padded with 255 (ignore). Equal, value for value, to
    albumentations' ``LongestMaxSize`` + ``PadIfNeeded(position="top_left")``, which the data layer
    used before (a test compares them).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        # cv2 rounds the float mean to the uint8 image's values (124, 116, 104), as albumentations did.
        self._fill = tuple(float(m) for m in PIXEL_MEAN)

    def resize(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[H, W, 3]`` uint8, ``[H, W]`` uint8 -> both with the long side ``size`` (h' and w' rounded)."""
        h, w = label.shape[:2]
        scale = self.size / max(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if (new_h, new_w) == (h, w):
            return image, label
        return (
            cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST),
        )

    def pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad bottom/right to at least ``size x size`` (mean pixel, label 255)."""
        h, w = label.shape[:2]
        bottom, right = max(0, self.size - h), max(0, self.size - w)
        if not (bottom or right):
            return image, label
        return (
            cv2.copyMakeBorder(image, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=self._fill),
            cv2.copyMakeBorder(label, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=IGNORE_INDEX),
        )

    def __call__(
        self, image: np.ndarray, label: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """-> (image ``[S, S, 3]`` uint8, label ``[S, S]`` uint8, valid (h, w) inside the square)."""
        image, label = self.resize(image, label)
        valid = (int(label.shape[0]), int(label.shape[1]))
        image, label = self.pad(image, label)
        return image, label, valid
