"""Segment new images from a few annotated examples, in Python: no Trainer, no DataModule, no temporary file.

>>> from fewshot_seg import Segmenter                                              # doctest: +SKIP
>>> seg = Segmenter.from_checkpoint("stage2.ckpt", device="cpu")                   # doctest: +SKIP
>>> supports = seg.encode_supports(["a.jpg"], ["a_mask.png"])                      # doctest: +SKIP
>>> masks = seg.segment(["q1.jpg", "q2.jpg"], supports)                           # doctest: +SKIP
>>> classes = seg.encode_classes({"scratch": [("s.jpg", "s_mask.png")], "dent": [...]})  # doctest: +SKIP
>>> labels = seg.segment_classes(["q1.jpg"], classes)[0].labels  # 0 bg, 1 scratch, 2 dent # doctest: +SKIP

The supports are encoded once (the backbone and everything of Mask Matching that depends on them alone)
and reused for every query batch. The forward pass is the one ``MMModule`` trains, tests and predicts
with (``models.mm_forward``), the networks come from the checkpoint through ``fewshot_seg.networks``, and
images are read and letterboxed by ``fewshot_seg.user_images``, the functions ``FolderEpisodeDataModule``
uses, so a mask equals what ``fewshot-seg predict`` writes for the same episode. Importing it imports
neither Lightning nor the data layer.

Several classes at once (``encode_classes`` / ``segment_classes``; ``fewshot_seg.multiclass``): each class's
supports are encoded once, a query runs through the backbone and the POS once for all classes and through
Mask Matching once per class; a pixel gets the class of highest probability above 0.5, background elsewhere
(docs/inference.md, "Several classes at once").
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from fewshot_seg.episode import IGNORE_INDEX, image_tensor, normalize_images
from fewshot_seg.errors import DatasetError
from fewshot_seg.evaluation import THRESHOLD, resize_to_labels
from fewshot_seg.models.graphs import GraphedForward
from fewshot_seg.models.mask_matching import MaskMatching, SupportEncoding
from fewshot_seg.models.mm_forward import encode_supports, segment_queries
from fewshot_seg.multiclass import (
    ClassExamples,
    ClassSegmentation,
    EncodedClasses,
    IndexedExamples,
    NamedExamples,
    check_at_model_size,
    class_segmentation,
    collect_examples,
    match_classes,
)
from fewshot_seg.networks import PAPER_IMAGE_SIZE, load_networks
from fewshot_seg.user_images import (
    ImageInput,
    Letterbox,
    MaskInput,
    check_same_size,
    describe,
    read_user_image,
    read_user_mask,
    require_object,
    require_object_resized,
)

Device = Literal["auto", "cpu", "cuda"] | str
Precision = Literal["32", "bf16"]
OnError = Literal["raise", "skip"]


@dataclass
class Supports:
    """An encoded support set (:meth:`Segmenter.encode_supports`), reusable for any number of queries."""

    encoding: SupportEncoding
    shot: int
    image_size: int
    """the model input size the supports were encoded at (queries must use the same)."""


class Segmenter:
    """A trained MM-Former (backbone + POS + Mask Matching) in evaluation mode on one device.

    One class: :meth:`encode_supports` then :meth:`segment`. N classes: :meth:`encode_classes` then
    :meth:`segment_classes` (a label map per query; backbone and POS once per query for all classes).

    Args:
        backbone, pos, mask_matching: the trained networks (plain ``nn.Module``s).
        image_size: side of the square model input; images keep their aspect ratio and are padded
            (the ``spec`` evaluation protocol), and masks come back at each image's displayed size.
        device: "auto" (CUDA when available), "cpu", "cuda" or any torch device string.
        precision: "32", or "bf16" (autocast; meant for CUDA).
        cuda_graphs: replay the query path from CUDA graphs, one per query batch size and support set
            (``fewshot_seg.models.graphs``; the input size is fixed by the letterbox); ignored off CUDA.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pos: nn.Module,
        mask_matching: MaskMatching,
        image_size: int = PAPER_IMAGE_SIZE,
        device: Device = "auto",
        precision: Precision = "32",
        cuda_graphs: bool = False,
    ) -> None:
        if precision not in ("32", "bf16"):
            raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        self.device = torch.device(_resolve_device(device))
        self.precision = precision
        self.image_size = int(image_size)
        self.backbone, self.pos, self.mask_matching = (
            m.eval().requires_grad_(False).to(self.device) for m in (backbone, pos, mask_matching)
        )
        self._transform = Letterbox(self.image_size)
        self._queries = GraphedForward(
            partial(segment_queries, self.backbone, self.pos, self.mask_matching), enabled=cuda_graphs
        )

    @property
    def default_batch_size(self) -> int:
        """Queries per forward pass when none is given: 8 on CUDA; 1 on the CPU, where a batch of 480-px
        queries measured slower per image (cache-bound convolutions and products; docs/inference.md)."""
        return 8 if self.device.type == "cuda" else 1

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: Device = "auto",
        image_size: int | None = None,
        precision: Precision = "32",
        cuda_graphs: bool = False,
    ) -> Segmenter:
        """A Segmenter from a stage-2 checkpoint of this project or the authors' released MM-Former file.

        Args:
            path: an ``MMModule`` Lightning checkpoint (self-contained: backbone, POS and Mask Matching), or
                a reference (detectron2-style) MM-Former state dict with Mask Matching weights; its
                backbone depth (ResNet-50/101) is read from its keys.
            image_size: model input side; None = the size the model was trained at (recorded in the
                checkpoint; 480, the paper's, for reference files).
            cuda_graphs: see :class:`Segmenter`.

        Raises:
            CheckpointError: naming the file: missing, unreadable, a stage-1 checkpoint, or weights that do
                not fit.
        """
        backbone, pos, mm, trained_size = load_networks(path)
        return cls(
            backbone,
            pos,
            mm,
            trained_size if image_size is None else image_size,
            device,
            precision,
            cuda_graphs,
        )

    # ------------------------------------------------------------------ supports
    def encode_supports(self, images: Sequence[ImageInput], masks: Sequence[MaskInput]) -> Supports:
        """Encode K >= 1 (image, mask) pairs once.

        Args:
            images: K images (paths, PIL images or ``[H, W, 3]`` uint8 RGB arrays).
            masks: K masks (paths, PIL images or ``[H, W]`` arrays), each the size of its image, by the
                mask convention of ``fewshot_seg.user_images`` ({0, 255} / {0, 1} binary; class ids:
                0 background, 255 ignore, other values the object; anti-aliased / JPEG: >= 128).

        Raises:
            DatasetError: naming the support: unreadable, mask size differs from its image's, or a mask
                that marks no object pixel.
        """
        images, masks = _as_list(images, "images"), _as_list(masks, "masks")
        if not images:
            raise DatasetError("encode_supports needs at least one support (image, mask) pair")
        if len(images) != len(masks):
            raise DatasetError(f"encode_supports got {len(images)} images but {len(masks)} masks")
        tensors, labels = [], []
        for i, (image_src, mask_src) in enumerate(zip(images, masks)):
            image = read_user_image(image_src, f"support image {i}")
            mask = read_user_mask(mask_src, f"support mask {i}")
            check_same_size(
                mask, image, describe(mask_src, f"support mask {i}"), describe(image_src, "its image")
            )
            require_object(mask, describe(mask_src, f"support mask {i}"))
            img, lab, _ = self._transform(image, mask)
            require_object_resized(lab, describe(mask_src, f"support mask {i}"), self.image_size)
            tensors.append(image_tensor(img))
            labels.append(torch.from_numpy(lab))  # uint8 to the device, widened there (as loaders' labels)
        with self._inference():
            encoding = encode_supports(
                self.backbone,
                self.mask_matching,
                normalize_images(torch.stack(tensors)[None].to(self.device)),  # [1, K, 3, S, S]: one set
                torch.stack(labels)[None].to(self.device).long(),  # [1, K, S, S] in {0, 1, 255}
            )
        return Supports(encoding=encoding, shot=len(tensors), image_size=self.image_size)

    # ------------------------------------------------------------------ queries
    def segment(
        self,
        queries: Sequence[ImageInput] | ImageInput,
        supports: Supports,
        batch_size: int | None = None,
        return_probabilities: bool = False,
        on_error: OnError = "raise",
    ) -> list[np.ndarray | None]:
        """Segment each query against encoded supports.

        Args:
            queries: images (paths, PIL images, ``[H, W, 3]`` uint8 RGB arrays), or one image.
            supports: from :meth:`encode_supports` of this Segmenter.
            batch_size: queries per forward pass; None = :attr:`default_batch_size` (8 on a GPU, 1 on the
                CPU, where a batch of 480-px images runs slower per image than one at a time).
            return_probabilities: return the foreground maps instead of masks.
            on_error: what a query that cannot be read does. "raise" (default): the DatasetError ends the
                call and the results of the queries before it are lost with it (iterate
                :meth:`iter_segment` to keep them). "skip": its place in the list holds None, and a
                warning names it and why.

        Returns:
            One array per query at its displayed size (EXIF orientation applied): ``[H, W]`` uint8 in
            {0, 1}, or with ``return_probabilities`` float32 in [0, 1] (the merged Mask Matching map,
            clipped; the mask is ``probability > 0.5``); None for a query skipped by ``on_error="skip"``.
        """
        try:
            return list(self.iter_segment(queries, supports, batch_size, return_probabilities, on_error))
        except DatasetError as err:
            raise DatasetError(
                f"{err} (segment returns nothing then: on_error='skip' puts None in its place, "
                "iter_segment yields the results before it)"
            ) from err

    def iter_segment(
        self,
        queries: Sequence[ImageInput] | ImageInput,
        supports: Supports,
        batch_size: int | None = None,
        return_probabilities: bool = False,
        on_error: OnError = "raise",
    ) -> Iterator[np.ndarray | None]:
        """:meth:`segment`, one query's result at a time (only one batch of images is held)."""
        _check_encoded(supports, Supports, "supports", "encode_supports")
        self._check_image_size(supports.image_size, "supports")
        for arrays in self._query_batches(queries, batch_size, on_error):
            readable = [a for a in arrays if a is not None]
            results = iter(self.segment_arrays(readable, supports, return_probabilities) if readable else ())
            yield from (None if a is None else next(results) for a in arrays)

    def segment_arrays(
        self, images: Sequence[np.ndarray], supports: Supports, return_probabilities: bool = False
    ) -> list[np.ndarray]:
        """One forward pass over already read ``[H, W, 3]`` uint8 RGB images (see :meth:`segment`)."""
        _check_encoded(supports, Supports, "supports", "encode_supports")
        batch, valid = self._prepare_queries(images)
        with self._inference():
            out = self._queries(batch, supports.encoding)
        # Resized to each image's size on the CPU: a large image is never held at full size on the device.
        maps = resize_to_labels(out["foreground"].float().cpu(), valid, [img.shape[:2] for img in images])
        if return_probabilities:
            return [m.clamp(0.0, 1.0).numpy().astype(np.float32) for m in maps]
        return [(m > THRESHOLD).numpy().astype(np.uint8) for m in maps]

    # ------------------------------------------------------------------ N classes (docs/inference.md)
    def encode_classes(
        self,
        classes: NamedExamples | ClassExamples = (),
        *,
        indexed: IndexedExamples = (),
        class_names: Sequence[str] | str | os.PathLike | None = None,
    ) -> EncodedClasses:
        """Encode the supports of N classes once, each class as :meth:`encode_supports` would.

        Args:
            classes: ``{"scratch": [(image, mask), ...], "dent": [...]}``, or ``[(name, image, mask), ...]``
                (a name repeats for several shots), binary masks by the mask convention; or the
                :class:`~fewshot_seg.multiclass.ClassExamples` of ``multiclass.examples_from_folder``.
            indexed: (image, class-index mask) pairs: 0 background, 255 ignore, i = ``class_names[i-1]``;
                one image gives a support to every class it holds.
            class_names: the classes in label order (a list, or a ``classes.txt`` path, one name a line);
                needed with ``indexed``. Without it, classes are numbered in the order ``classes`` names them.

        Returns:
            The :class:`~fewshot_seg.multiclass.EncodedClasses`; label value i is its ``names[i - 1]``.

        Raises:
            DatasetError: in one line naming the class or file: a class with no support, a name given twice,
                a class-index value that is no class, a support mask that marks no object pixel (also once
                resized to the model input: a tiny object can vanish), or an error of :meth:`encode_supports`.
        """
        if not isinstance(classes, ClassExamples):
            classes = collect_examples(classes, indexed, class_names)
        encoded = []
        check_at_model_size(classes, self.image_size)
        for name in classes.names:
            examples = classes.examples[name]
            encoded.append(self.encode_supports([e.image for e in examples], [e.mask for e in examples]))
        return EncodedClasses(names=tuple(classes.names), supports=tuple(encoded), image_size=self.image_size)

    def segment_classes(
        self,
        queries: Sequence[ImageInput] | ImageInput,
        classes: EncodedClasses,
        batch_size: int | None = None,
        return_probabilities: bool = False,
    ) -> list[ClassSegmentation]:
        """Label each query with N classes: backbone and POS once per query, Mask Matching once per class.

        Args:
            queries, batch_size: as :meth:`segment`.
            classes: from :meth:`encode_classes` of this Segmenter.
            return_probabilities: also return each class's probability map (``[N, H, W]``; N maps of the
                image's size are held per query).

        Returns:
            One :class:`~fewshot_seg.multiclass.ClassSegmentation` per query at its displayed size: ``labels``
            ``[H, W]`` uint8 (0 background, i = ``classes.names[i - 1]``; per pixel the class of highest
            probability where it exceeds 0.5, background elsewhere), ``confidence`` (that highest probability)
            and, on request, ``probabilities``: class i's map equals :meth:`segment`'s for its supports alone.
        """
        return list(self.iter_segment_classes(queries, classes, batch_size, return_probabilities))

    def iter_segment_classes(
        self,
        queries: Sequence[ImageInput] | ImageInput,
        classes: EncodedClasses,
        batch_size: int | None = None,
        return_probabilities: bool = False,
    ) -> Iterator[ClassSegmentation]:
        """:meth:`segment_classes`, one query's result at a time (only one batch of images is held)."""
        _check_encoded(classes, EncodedClasses, "classes", "encode_classes")
        self._check_image_size(classes.image_size, "classes")
        for arrays in self._query_batches(queries, batch_size):
            yield from self.segment_class_arrays(arrays, classes, return_probabilities)

    def segment_class_arrays(
        self, images: Sequence[np.ndarray], classes: EncodedClasses, return_probabilities: bool = False
    ) -> list[ClassSegmentation]:
        """One forward pass over already read ``[H, W, 3]`` uint8 RGB images (see :meth:`segment_classes`)."""
        batch, valid = self._prepare_queries(images)
        with self._inference():
            maps = match_classes(self.backbone, self.pos, self.mask_matching, batch, classes.encodings)
        maps = maps.float().cpu()  # [B, N, S, S]; resized on the CPU, as segment_arrays does
        return [
            class_segmentation(maps[i], valid[i], img.shape[:2], return_probabilities)
            for i, img in enumerate(images)
        ]

    def _check_image_size(self, encoded_at: int, what: str) -> None:
        if encoded_at != self.image_size:
            raise ValueError(
                f"{what} were encoded at image_size {encoded_at}, this Segmenter uses "
                f"{self.image_size}: encode them with this Segmenter"
            )

    def _query_batches(
        self, queries: Sequence[ImageInput] | ImageInput, batch_size: int | None, on_error: OnError = "raise"
    ) -> Iterator[list[np.ndarray | None]]:
        """The queries read (``[H, W, 3]`` uint8 RGB), ``batch_size`` at a time: one batch held at once.
        With ``on_error="skip"`` an unreadable query is None, and a warning names it."""
        batch_size = batch_size or self.default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        items = _as_list(queries, "queries")
        for start in range(0, len(items), batch_size):
            batch: list[np.ndarray | None] = []
            for i, q in enumerate(items[start : start + batch_size], start):
                try:
                    batch.append(read_user_image(q, f"query {i}"))
                except DatasetError as err:
                    if on_error == "raise":
                        raise
                    warnings.warn(f"query {i} skipped: {err}", stacklevel=4)
                    batch.append(None)
            yield batch

    def _prepare_queries(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> normalised ``[B, 3, S, S]`` on the device, valid ``[B, 2]`` (h, w) inside the square."""
        prepared = [self._transform(img, np.full(img.shape[:2], IGNORE_INDEX, np.uint8)) for img in images]
        # uint8 to the device, normalised there: as a loader's batch in the LightningModules.
        batch = normalize_images(torch.stack([image_tensor(img) for img, _, _ in prepared]).to(self.device))
        return batch, torch.tensor([v for _, _, v in prepared])

    def _inference(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack


def _resolve_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available here; use 'cpu' or 'auto'")
    return str(device)


def _check_encoded(value: object, kind: type, argument: str, method: str) -> None:
    """Refuse anything but what ``method`` returns, naming the argument (``supports=None`` is a mistake
    the attribute access further down would only report as an AttributeError)."""
    if not isinstance(value, kind):
        raise TypeError(
            f"{argument}: expected the {kind.__name__} that Segmenter.{method} returns, "
            f"got {type(value).__name__}"
        )


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, os.PathLike, np.ndarray, Image.Image)):  # one item
        return [items]
    try:
        return list(items)
    except TypeError:
        raise DatasetError(f"{what}: expected a list of images, got {type(items).__name__}") from None


__all__ = ["Segmenter", "Supports"]
