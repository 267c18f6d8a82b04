"""Albumentations pipelines for training and test episodes, and conversion to model tensors.

Every random decision comes from a ``numpy.random.Generator`` handed in by the caller (derived from
``(seed, pass, index)`` of the episode key), so an episode is the same whichever worker process builds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from fewshot_seg.episode import IGNORE_INDEX
from fewshot_seg.user_images import Letterbox

# SPEC §4: shortest-edge scales for a 480 crop; other crop sizes scale them proportionally.
REFERENCE_SIZE = 480
REFERENCE_SCALES = tuple(range(320, 961, 64))
TRAIN_IMAGE_PAD = 128
# SPEC §5: a support must keep 1,843 px of its class in a 480 x 480 crop.
REFERENCE_SUPPORT_MIN_PIXELS = 1843


def default_train_scales(image_size: int) -> list[int]:
    """SPEC's {320, 384, ..., 960} shortest-edge scales, scaled by ``image_size / 480``."""
    return [max(1, round(s * image_size / REFERENCE_SIZE)) for s in REFERENCE_SCALES]


def default_support_min_pixels(image_size: int) -> int:
    """1,843 px at 480 x 480, scaled by the crop area: ``round(1843 * (image_size / 480) ** 2)``."""
    return max(1, round(REFERENCE_SUPPORT_MIN_PIXELS * (image_size / REFERENCE_SIZE) ** 2))


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') with the shorter side ``size`` and the aspect ratio kept (albumentations' rounding)."""
    scale = size / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _pad_bottom_right(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = label.shape
    if h >= size and w >= size:
        return image, label
    img = np.full((max(h, size), max(w, size), 3), TRAIN_IMAGE_PAD, dtype=np.uint8)
    lab = np.full((max(h, size), max(w, size)), IGNORE_INDEX, dtype=np.uint8)
    img[:h, :w] = image
    lab[:h, :w] = label
    return img, lab


class TrainAugment:
    """SPEC §4 training augmentation producing an ``image_size`` square crop.

    Shortest-edge resize to a random scale, a random ``image_size`` crop re-drawn until
    ``accept(label_crop)`` holds, then colour jitter and horizontal flip (albumentations) of the crop,
    then padding (image 128, label 255) at the bottom/right. The crop is searched on the resized label
    alone and the image is resized once, for the accepted crop; jitter and flip work on the crop, not on
    the up-to-960-px resized image (the flip commutes with a uniform random crop; the jitter's contrast
    uses the crop's mean). After ``crop_tries`` crops the scale is re-drawn, up to ``max_tries`` times;
    if nothing is accepted the image is resized to fit the crop whole (nothing is cut away), which keeps
    sampling finite on pathological inputs.
    """

    def __init__(
        self,
        image_size: int,
        scales: Sequence[int] | None = None,
        max_tries: int = 10,
        crop_tries: int = 5,
    ) -> None:
        self.image_size = image_size
        self.scales = list(scales) if scales else default_train_scales(image_size)
        self.max_tries = max_tries
        self.crop_tries = crop_tries
        self.photometric = A.Compose(
            [
                A.ColorJitter(brightness=0.2, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
                A.HorizontalFlip(p=0.5),
            ]
        )
        self.fallback = A.Compose(
            [
                A.LongestMaxSize(max_size=image_size),
                A.PadIfNeeded(
                    image_size,
                    image_size,
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=TRAIN_IMAGE_PAD,
                    fill_mask=IGNORE_INDEX,
                ),
            ]
        )

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        accept: Callable[[np.ndarray], bool],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment ``image [H, W, 3] uint8`` and ``label [H, W] uint8``; both come back ``S x S``."""
        s = self.image_size
        for _ in range(self.max_tries):
            h, w = shortest_edge_size(*label.shape, self.scales[int(rng.integers(len(self.scales)))])
            lab = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
            for _ in range(self.crop_tries):
                y0 = int(rng.integers(0, h - s + 1)) if h > s else 0
                x0 = int(rng.integers(0, w - s + 1)) if w > s else 0
                lab_c = lab[y0 : y0 + s, x0 : x0 + s]
                if accept(lab_c):
                    img_c = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)[
                        y0 : y0 + s, x0 : x0 + s
                    ]
                    self.photometric.set_random_seed(int(rng.integers(2**31)))
                    out = self.photometric(
                        image=np.ascontiguousarray(img_c), mask=np.ascontiguousarray(lab_c)
                    )
                    return _pad_bottom_right(out["image"], out["mask"], s)
        out = self.fallback(image=image, mask=label)
        return out["image"], out["mask"]


class TestTransform:
    """Deterministic test-time resizing (the scoring resolution of an evaluation protocol, SPEC §5).

    ``square=False``: resize so the long side is ``image_size`` keeping the aspect ratio, pad
    bottom/right to a square with the mean pixel (0 after normalisation) and label 255; the valid size
    is the resized extent. ``square=True``: resize image and label to ``image_size x image_size``
    without keeping the aspect ratio (image bilinear, label nearest, as the reference's evaluator).

    ``resize="cv2"``: the image is resized with OpenCV's bilinear interpolation (no antialiasing);
    ``"pil"``: with PIL's bilinear filter, as torchvision's ``Resize`` does on PIL images (antialiased
    when shrinking: the published HSNet / PATNet / Matcher loaders). Labels are always resized
    nearest-neighbour.
    """

    def __init__(self, image_size: int, square: bool = False, resize: str = "cv2") -> None:
        self.image_size = image_size
        self.square = square
        self.resize_mode = resize
        self.letterbox = None if square else Letterbox(image_size)
        self.resize = A.Compose([A.Resize(image_size, image_size)]) if square else None

    def __call__(
        self, image: np.ndarray, label: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """-> (image ``[S, S, 3]`` uint8, label ``[S, S]`` uint8, valid (h, w) inside the square)."""
        if self.letterbox is not None:
            resized, label = self.letterbox.resize(image, label)
        else:
            out = self.resize(image=image, mask=label)
            resized, label = out["image"], out["mask"]
        valid = (int(label.shape[0]), int(label.shape[1]))
        if self.resize_mode == "pil":
            size = (valid[1], valid[0])  # PIL: (width, height)
            resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        if self.letterbox is not None:
            resized, label = self.letterbox.pad(resized, label)
        return resized, label, valid
