"""N classes from a few examples each: the supports of every class, the merge rule, class-index masks.

What :meth:`fewshot_seg.Segmenter.encode_classes` and :meth:`~fewshot_seg.Segmenter.segment_classes` are
built on, and what a command line or a page turns its inputs into:

* :func:`collect_examples` gathers the supports of each class from (name, image, mask) triples or a
  ``{name: [(image, mask), ...]}`` mapping (binary masks, the one mask convention), and from
  class-index masks (0 background, 255 ignore, value i = the i-th class of ``classes.txt``), one of
  which may hold several classes; :func:`examples_from_folder` reads a ``--supports DIR`` tree.
* :func:`match_classes` runs a query batch through the backbone and the POS **once** and only Mask
  Matching once per class.
* :func:`merge_class_maps` is the merge rule: per pixel the class of highest probability where that
  probability passes the threshold, background elsewhere (docs/inference.md says why).

Label maps are uint8: 0 background, i = the i-th class, so at most :data:`MAX_CLASSES` = 254 classes
and 255 stays "ignore": a label map written by ``segment`` can be corrected and given back as a
class-index support mask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from fewshot_seg.episode import IGNORE_INDEX
from fewshot_seg.errors import DatasetError, reading
from fewshot_seg.evaluation import THRESHOLD, resize_to_labels
from fewshot_seg.models.mask_matching import MaskMatching, SupportEncoding
from fewshot_seg.models.mm_forward import propose
from fewshot_seg.user_images import (
    ImageInput,
    Letterbox,
    MaskInput,
    check_same_size,
    describe,
    image_extensions,
    is_mask_file,
    read_user_image,
    read_user_mask,
    require_object,
    require_object_resized,
)

MAX_CLASSES = 254
"""Label values 1..254 name classes; 0 is background and 255 "ignore" (the VOC convention)."""
CLASSES_FILE = "classes.txt"

NamedExamples = (
    Mapping[str, Sequence[tuple[ImageInput, MaskInput]]] | Sequence[tuple[str, ImageInput, MaskInput]]
)
"""``{"scratch": [(image, mask), ...], ...}`` or ``[("scratch", image, mask), ...]`` (binary masks)."""
IndexedExamples = Sequence[tuple[ImageInput, MaskInput]]
"""``[(image, class-index mask), ...]``: 0 background, 255 ignore, i = the i-th class name."""


@dataclass
class Example:
    """One support of one class, read and checked: ``image [H, W, 3]`` uint8, ``mask [H, W]`` {0, 1, 255}."""

    image: np.ndarray
    mask: np.ndarray
    name: str
    """how error messages name it (the mask file, and the class for a class-index mask)."""


@dataclass
class ClassExamples:
    """The supports of N classes, in label order (class i = ``names[i - 1]``), before encoding."""

    names: list[str]
    examples: dict[str, list[Example]] = field(default_factory=dict)


@dataclass
class EncodedClasses:
    """N encoded support sets (:meth:`Segmenter.encode_classes`), reusable for any number of queries.

    ``supports[i]`` is the :class:`fewshot_seg.segmenter.Supports` of ``names[i]`` (label value i + 1).
    """

    names: tuple[str, ...]
    supports: tuple  # tuple[Supports, ...]: typed loosely so that this module needs no Segmenter import
    image_size: int

    def __len__(self) -> int:
        return len(self.names)

    @property
    def encodings(self) -> list[SupportEncoding]:
        return [s.encoding for s in self.supports]


@dataclass
class ClassSegmentation:
    """One query's result against N classes, at the query's displayed size.

    Attributes:
        labels: ``[H, W]`` uint8: 0 background, i = class ``names[i - 1]``.
        confidence: ``[H, W]`` float32 in [0, 1]: the highest class probability at each pixel (clipped),
            i.e. the labelled class's probability on its pixels (COCO scores are its mean).
        probabilities: ``[N, H, W]`` float32 in [0, 1] per class, when asked for; else None.
    """

    labels: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray | None = None

    def fractions(self, n_classes: int) -> list[float]:
        """The fraction of the image each class 1..N covers (the manifest's per-class columns)."""
        counts = np.bincount(self.labels.ravel(), minlength=n_classes + 1)[1 : n_classes + 1]
        return (counts / max(self.labels.size, 1)).tolist()


# ------------------------------------------------------------------------------------- merge rule
def merge_class_maps(maps: Iterable[Tensor], threshold: float = THRESHOLD) -> tuple[Tensor, Tensor]:
    """Per pixel, the class of highest probability where it exceeds ``threshold``; background elsewhere.

    Args:
        maps: N foreground maps ``[H, W]`` of the same size, class 1 first (an iterator is consumed one
            map at a time, so N full-size maps are never held together).
        threshold: a class may label a pixel only where its map exceeds it (the single-class rule).

    Returns:
        ``labels [H, W]`` uint8 (0 = background, i = the i-th map; ties go to the lower index) and
        ``best [H, W]`` float32, the highest map value at each pixel.
    """
    best: Tensor | None = None
    index: Tensor | None = None
    for i, m in enumerate(maps, start=1):
        m = m.float()
        if best is None or index is None:
            best, index = m.clone(), torch.ones(m.shape, dtype=torch.uint8)
            continue
        wins = m > best  # strict: the first class keeps a tie
        best = torch.where(wins, m, best)
        index[wins] = i
    if best is None or index is None:
        raise ValueError("merge_class_maps needs at least one class map")
    labels = torch.where(best > threshold, index, torch.zeros_like(index))
    return labels, best


@torch.no_grad()
def match_classes(
    backbone: nn.Module,
    pos: nn.Module,
    mask_matching: MaskMatching,
    images: Tensor,
    encodings: Sequence[SupportEncoding],
) -> Tensor:
    """Foreground maps of a query batch against N classes; backbone and POS run once for all of them.

    Args:
        images: ``[B, 3, H, W]`` normalised queries (padded to the model input size).
        encodings: N support encodings (``models.mm_forward.encode_supports``), each of batch 1 or B.

    Returns:
        ``[B, N, H, W]``: class i's map is the ``foreground`` that ``segment_queries`` gives for its supports.
    """
    feats, logits = propose(backbone, pos, images)
    hw = (images.shape[-2], images.shape[-1])
    logits = logits.float()
    return torch.stack(
        [mask_matching.match(feats, enc, logits, image_size=hw)["foreground"] for enc in encodings], 1
    )


def class_segmentation(
    maps: Tensor, valid: Tensor, size: tuple[int, int], with_probabilities: bool = False
) -> ClassSegmentation:
    """One query's N maps at the model input -> its :class:`ClassSegmentation` at the image's size.

    Args:
        maps: ``[N, S, S]`` float foreground maps (:func:`match_classes` of one query), on the CPU.
        valid: ``[2]`` (h, w) of the query's content inside the square.
        size: the image's (H, W).
        with_probabilities: keep the N resized maps (clipped to [0, 1]).
    """
    resized = (resize_to_labels(m[None], valid[None], [size])[0] for m in maps)  # one class at a time
    kept: list[Tensor] = []
    if with_probabilities:
        kept = list(resized)
        resized = iter(kept)
    labels, best = merge_class_maps(resized)
    return ClassSegmentation(
        labels=labels.numpy(),
        confidence=best.clamp(0.0, 1.0).numpy().astype(np.float32),
        probabilities=torch.stack(kept).clamp(0.0, 1.0).numpy().astype(np.float32) if kept else None,
    )


# ------------------------------------------------------------------------------------- class names
def check_class_names(names: Sequence[str], source: str) -> list[str]:
    """Names stripped and checked: none empty, none given twice, at most :data:`MAX_CLASSES`."""
    out: list[str] = []
    for i, raw in enumerate(names, start=1):
        name = str(raw).strip()
        if not name:
            raise DatasetError(f"{source}: class {i} has an empty name")
        if name in out:
            raise DatasetError(
                f"{source}: class name {name!r} is given twice (classes {out.index(name) + 1} and {i})"
            )
        out.append(name)
    if len(out) > MAX_CLASSES:
        raise DatasetError(f"{source}: {len(out)} classes, at most {MAX_CLASSES} (label values 1..254)")
    return out


def read_class_names(path: str | os.PathLike) -> list[str]:
    """``classes.txt``: one class name per non-blank line; line order gives the values 1, 2, ..."""
    with reading(path, "class names file", kind="a text file"):
        text = Path(path).read_text(encoding="utf-8")
    return check_class_names([line for line in text.splitlines() if line.strip()], os.fspath(path))


# ------------------------------------------------------------------------------------- class-index masks
def read_index_mask(source: MaskInput, what: str = "class-index mask") -> np.ndarray:
    """``[H, W]`` uint8 label values of a class-index mask (a palette PNG gives its indices, not colours)."""
    name = describe(source, what)
    if isinstance(source, (str, os.PathLike)):
        with reading(source, what), Image.open(source) as im:
            im.load()
            source = ImageOps.exif_transpose(im) or im
    elif isinstance(source, Image.Image):
        source = ImageOps.exif_transpose(source) or source
    if isinstance(source, Image.Image):
        source = np.asarray(source if source.mode in ("L", "P") else source.convert("L"))
    if not isinstance(source, np.ndarray):
        raise DatasetError(
            f"{what}: expected a path, a PIL image or a numpy array, got {type(source).__name__}"
        )
    if source.ndim != 2 or not np.issubdtype(source.dtype, np.integer):
        raise DatasetError(
            f"{name} must be an [H, W] integer label map, got {source.dtype} {list(source.shape)}"
        )
    if source.size and (source.min() < 0 or source.max() > 255):
        raise DatasetError(f"{name} holds values outside 0..255")
    return source.astype(np.uint8, copy=False)


def split_index_mask(values: np.ndarray, names: Sequence[str], name: str) -> dict[str, np.ndarray]:
    """The binary {0, 1, 255} support mask of each class a class-index mask holds.

    Pixels of the other classes are background for a class (as the binary episode labels of training
    treat other objects); 255 stays ignore everywhere.

    Raises:
        DatasetError: naming the mask, for a value that is no class of ``names`` (values 1..N).
    """
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    unknown = [int(v) for v in present if v not in (0, IGNORE_INDEX) and v > len(names)]
    if unknown:
        raise DatasetError(
            f"{name} holds the value {unknown[0]}, which is no class: {len(names)} class name(s) give values "
            f"1..{len(names)} (0 background, 255 ignore)"
        )
    out = {}
    for v in present:
        if v in (0, IGNORE_INDEX):
            continue
        mask = (values == v).astype(np.uint8)
        mask[values == IGNORE_INDEX] = IGNORE_INDEX
        out[names[int(v) - 1]] = mask
    return out


# ------------------------------------------------------------------------------------- collecting
def _named_items(named: NamedExamples) -> list[tuple[str, ImageInput, MaskInput]]:
    if isinstance(named, Mapping):
        return [(name, img, mask) for name, pairs in named.items() for img, mask in pairs]
    items = list(named)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 3):
            raise DatasetError(f"class supports: expected (name, image, mask) triples, got {item!r:.80}")
    return items


def collect_examples(
    named: NamedExamples = (),
    indexed: IndexedExamples = (),
    class_names: Sequence[str] | str | os.PathLike | None = None,
) -> ClassExamples:
    """Read and check the supports of every class.

    Args:
        named: binary supports by class name (mapping or triples; a name repeats for several shots).
        indexed: (image, class-index mask) pairs; each gives a support to every class it holds.
        class_names: the class names in label order (a list or a ``classes.txt`` path). Required with
            ``indexed``; when given, every named class must be one of them. Without it, classes are
            numbered in the order they first appear in ``named``.

    Raises:
        DatasetError: in one line naming the class or file: a class with no support, a name given twice,
            a class-index value that is no class, an unreadable file, a mask of another size than its
            image, or a support mask without object pixels.
    """
    items = _named_items(named)
    if isinstance(class_names, (str, os.PathLike)):
        names = read_class_names(class_names)
    elif class_names is not None:
        names = check_class_names(list(class_names), "class names")
    else:
        if indexed:
            raise DatasetError(
                f"class-index masks need the class names ({CLASSES_FILE} or a list): value i = the i-th name"
            )
        names = check_class_names(list(dict.fromkeys(str(n).strip() for n, _, _ in items)), "class names")
    result = ClassExamples(names=names, examples={n: [] for n in names})
    for k, (name, img_src, mask_src) in enumerate(items):
        name = str(name).strip()
        if name not in result.examples:
            raise DatasetError(f"support {k} names the class {name!r}, which is not among {names}")
        what = f"support mask {k} (class {name!r})"
        image = read_user_image(img_src, f"support image {k} (class {name!r})")
        mask = read_user_mask(mask_src, what)
        check_same_size(mask, image, describe(mask_src, what), describe(img_src, "its image"))
        require_object(mask, describe(mask_src, what))
        result.examples[name].append(Example(image, mask, describe(mask_src, what)))
    for k, (img_src, mask_src) in enumerate(indexed):
        what = f"class-index mask {k}"
        image = read_user_image(img_src, f"class-index support image {k}")
        values = read_index_mask(mask_src, what)
        check_same_size(values, image, describe(mask_src, what), describe(img_src, "its image"))
        for name, mask in split_index_mask(values, names, describe(mask_src, what)).items():
            result.examples[name].append(Example(image, mask, f"{describe(mask_src, what)}, class {name!r}"))
    missing = [n for n in names if not result.examples[n]]
    if missing:
        raise DatasetError(f"class {missing[0]!r} has no support (no mask marks it)")
    if not names:
        raise DatasetError("encode_classes needs at least one class with one support")
    return result


def check_at_model_size(classes: ClassExamples, image_size: int) -> None:
    """Every support mask still marks an object pixel once letterboxed to the model input.

    A few pixels in a large photo can vanish at ``image_size``: checked before any encoding, so that a
    command line (one process or every DDP rank alike) stops in one line before it starts the model.

    Raises:
        DatasetError: naming the support mask and the model input size.
    """
    transform = Letterbox(image_size)
    for name in classes.names:
        for ex in classes.examples[name]:
            require_object_resized(transform(ex.image, ex.mask)[1], ex.name, image_size)


def examples_from_folder(root: str | os.PathLike) -> ClassExamples:
    """The supports of a ``--supports DIR`` tree.

    Layout: ``DIR/<class name>/<img>`` with ``<img stem>_mask.png`` beside it (binary masks, one class per
    folder), and/or ``DIR/<img>`` with a class-index ``<img stem>_mask.png`` and ``DIR/classes.txt`` (one
    name a line; value i = line i). With ``classes.txt`` the classes keep its order; without it, the
    folders' names in sorted order.

    Raises:
        DatasetError: naming the folder or file: missing folder, an image without its mask, class-index
            masks without ``classes.txt``, or any error of :func:`collect_examples`.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"supports folder {base} does not exist or is not a folder")
    exts = image_extensions()

    def pairs(folder: Path) -> list[tuple[Path, Path]]:
        found = []
        for img in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts):
            if is_mask_file(img) or img.name.startswith("."):
                continue
            mask = img.with_name(f"{img.stem}_mask.png")
            if not mask.is_file():
                raise DatasetError(f"support image {img} has no mask {mask.name} beside it")
            found.append((img, mask))
        return found

    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    named = [(f.name, img, mask) for f in folders for img, mask in pairs(f)]
    indexed = pairs(base)
    classes_txt = base / CLASSES_FILE
    if indexed and not classes_txt.is_file():
        raise DatasetError(
            f"{base} holds class-index masks ({indexed[0][1].name}, ...) but no {CLASSES_FILE}"
        )
    if classes_txt.is_file():
        return collect_examples(named, indexed, classes_txt)
    return collect_examples(named, (), [f.name for f in folders])


__all__ = [
    "CLASSES_FILE",
    "MAX_CLASSES",
    "ClassExamples",
    "ClassSegmentation",
    "EncodedClasses",
    "Example",
    "check_at_model_size",
    "check_class_names",
    "class_segmentation",
    "collect_examples",
    "examples_from_folder",
    "match_classes",
    "merge_class_maps",
    "read_class_names",
    "read_index_mask",
    "split_index_mask",
]
