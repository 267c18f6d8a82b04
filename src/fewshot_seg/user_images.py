"""Reading a user's own images and masks (folder episodes, ``Segmenter``, ``fewshot-seg segment|serve``).

Benchmarks read their files exactly as the published loaders do (``source.read_rgb``); a user's photos
and masks get two more rules, one meaning for one file everywhere:

* **Orientation**: the EXIF orientation tag is applied, so an image is segmented as a viewer shows it
  (a phone photo stored sideways comes back as a mask of its displayed size).
* **Mask convention**: a mask whose values are only {0, 255} or only {0, 1} (or a bool array) is
  binary: the non-zero value is the object. A mask with more values follows the VOC convention:
  0 background, 255 ignore (never scored, never a support pixel), any other value the object.
  Colour masks (RGB) are read as their greyscale (``L``) values first.
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
    "a mask with only the values {0, 255} or {0, 1} is binary (object = the non-zero value); with more "
    "values, 0 = background, 255 = ignore and any other value = the object"
)
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
        DatasetError: naming the file (or ``what``) when it is missing, unreadable or of a refused kind.
    """
    name = describe(source, what)
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


def mask_from_values(values: np.ndarray, name: str = "mask") -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1, 255} from mask values, by :data:`MASK_CONVENTION`."""
    if values.ndim != 2:
        raise DatasetError(f"{name} has shape {list(values.shape)}; expected [H, W]")
    if values.dtype == bool:
        return values.astype(np.uint8)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise DatasetError(f"{name} has dtype {values.dtype}; expected bool or integers 0..255")
    integral = np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values))
    if values.size and (values.min() < 0 or values.max() > 255 or not integral):
        raise DatasetError(f"{name} holds values outside the integers 0..255 ({MASK_CONVENTION})")
    m = values.astype(np.uint8, copy=False)
    present = set(np.flatnonzero(np.bincount(m.ravel(), minlength=256)).tolist())
    if present <= {0, 255} or present <= {0, 1}:
        return (m != 0).astype(np.uint8)
    out = (m != 0).astype(np.uint8)
    out[m == IGNORE_INDEX] = IGNORE_INDEX
    return out


def read_user_mask(source: MaskInput, what: str = "mask") -> np.ndarray:
    """``[H, W]`` uint8 in {0, 1, 255} (1 = object, 255 = ignore) from a mask file, PIL image or array."""
    name = describe(source, what)
    if isinstance(source, (str, os.PathLike)):
        source = _open(source, what)
    elif isinstance(source, Image.Image):
        source = ImageOps.exif_transpose(source) or source
    if isinstance(source, Image.Image):
        if source.mode == "1":
            values = np.asarray(source, dtype=bool)
        elif source.mode in ("L", "P") or source.mode in _SIXTEEN_BIT or source.mode == "I":
            values = np.asarray(source)
        else:
            values = np.asarray(source.convert("L"))
        return mask_from_values(values, name)
    if isinstance(source, np.ndarray):
        return mask_from_values(source, name)
    raise DatasetError(f"{what}: expected a path, a PIL image or a numpy array, got {type(source).__name__}")


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


def image_extensions() -> frozenset[str]:
    """File extensions PIL can open here (``.jpg``, ``.png``, ``.webp``, ...), lower case."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_mask_file(path: Path) -> bool:
    """``<name>_mask.<ext>``: a mask beside its image, never an image of its own."""
    return path.stem.endswith("_mask")


def scan_images(
    folder: Path, recursive: bool = False, exclude: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(images, unsupported files) of ``folder``, sorted: the one folder scanner of the folder DataModule
    and ``fewshot-seg segment``.

    Hidden files (``.name``: editor and OS leftovers, our own ``.tmp`` files) and masks (``*_mask.*``) are
    neither; so is everything under ``exclude`` (an output folder inside the input folder). A file whose
    extension PIL does not open is unsupported.
    """
    exts = image_extensions()
    skip = exclude.resolve() if exclude is not None else None
    images, unsupported = [], []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
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
