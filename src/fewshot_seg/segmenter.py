"""Segment new images from a few annotated examples, in Python: no Trainer, no DataModule, no temporary file.

>>> from fewshot_seg import Segmenter                                              # doctest: +SKIP
>>> seg = Segmenter.from_checkpoint("stage2.ckpt", device="cpu")                   # doctest: +SKIP
>>> supports = seg.encode_supports(["a.jpg"], ["a_mask.png"])                      # doctest: +SKIP
>>> masks = seg.segment(["q1.jpg", "q2.jpg"], supports, batch_size=8)              # doctest: +SKIP

The supports are encoded once (the backbone and everything of Mask Matching that depends on them alone)
and reused for every query batch. The forward pass is the one ``MMModule`` trains, tests and predicts
with (``models.inference``), and images are prepared by the same functions as ``FolderEpisodeDataModule``
(``datamodules.user_images``, ``TestTransform``), so a mask equals what ``fewshot-seg predict`` writes
for the same episode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from datamodules.errors import DatasetError
from datamodules.transforms import TestTransform, image_tensor
from datamodules.user_images import (
    ImageInput,
    MaskInput,
    check_same_size,
    describe,
    read_user_image,
    read_user_mask,
    require_object,
)
from fewshot_seg.config import BackboneConfig, MaskMatchingConfig, POSConfig, coerce
from fewshot_seg.episode import IGNORE_INDEX, normalize_images
from fewshot_seg.evaluation import THRESHOLD, resize_to_labels
from fewshot_seg.lightning.checkpoints import (
    STAGE_CLASS,
    CheckpointError,
    checkpoint_stage,
    is_lightning_checkpoint,
    read_checkpoint,
)
from fewshot_seg.lightning.provenance import PROVENANCE_KEY
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.build import build_mask_matching, build_pos
from fewshot_seg.models.convert import (
    CheckpointMismatchError,
    has_mask_matching,
    load_reference_checkpoint,
    reference_backbone_name,
    unwrap_state_dict,
)
from fewshot_seg.models.graphs import GraphedForward
from fewshot_seg.models.inference import encode_supports, segment_queries
from fewshot_seg.models.mask_matching import MaskMatching, SupportEncoding

Device = Literal["auto", "cpu", "cuda"] | str
Precision = Literal["32", "bf16"]
PAPER_IMAGE_SIZE = 480


@dataclass
class Supports:
    """An encoded support set (:meth:`Segmenter.encode_supports`), reusable for any number of queries."""

    encoding: SupportEncoding
    shot: int
    image_size: int
    """the model input size the supports were encoded at (queries must use the same)."""


class Segmenter:
    """A trained MM-Former (backbone + POS + Mask Matching) in evaluation mode on one device.

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
        self._transform = TestTransform(self.image_size, square=False)
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
        name = os.fspath(path)
        ckpt = read_checkpoint(name, "checkpoint")
        if is_lightning_checkpoint(ckpt):
            backbone, pos, mm, trained_size = _from_lightning(ckpt, name)
        else:
            backbone, pos, mm = _from_reference(ckpt, name)
            trained_size = PAPER_IMAGE_SIZE
        return cls(backbone, pos, mm, image_size or trained_size, device, precision, cuda_graphs)

    # ------------------------------------------------------------------ supports
    def encode_supports(self, images: Sequence[ImageInput], masks: Sequence[MaskInput]) -> Supports:
        """Encode K >= 1 (image, mask) pairs once.

        Args:
            images: K images (paths, PIL images or ``[H, W, 3]`` uint8 RGB arrays).
            masks: K masks (paths, PIL images or ``[H, W]`` arrays), each the size of its image, by the
                mask convention of ``datamodules.user_images`` ({0, 255} / {0, 1} binary; else 0
                background, 255 ignore, other values the object).

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
    ) -> list[np.ndarray]:
        """Segment each query against encoded supports.

        Args:
            queries: images (paths, PIL images, ``[H, W, 3]`` uint8 RGB arrays), or one image.
            supports: from :meth:`encode_supports` of this Segmenter.
            batch_size: queries per forward pass; None = :attr:`default_batch_size` (8 on a GPU, 1 on the
                CPU, where a batch of 480-px images runs slower per image than one at a time).
            return_probabilities: return the foreground maps instead of masks.

        Returns:
            One array per query at its displayed size (EXIF orientation applied): ``[H, W]`` uint8 in
            {0, 1}, or with ``return_probabilities`` float32 in [0, 1] (the merged Mask Matching map,
            clipped; the mask is ``probability > 0.5``).
        """
        return list(self.iter_segment(queries, supports, batch_size, return_probabilities))

    def iter_segment(
        self,
        queries: Sequence[ImageInput] | ImageInput,
        supports: Supports,
        batch_size: int | None = None,
        return_probabilities: bool = False,
    ) -> Iterator[np.ndarray]:
        """:meth:`segment`, one query's result at a time (only one batch of images is held)."""
        if supports.image_size != self.image_size:
            raise ValueError(
                f"supports were encoded at image_size {supports.image_size}, this Segmenter uses "
                f"{self.image_size}: encode them with this Segmenter"
            )
        batch_size = batch_size or self.default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        items = _as_list(queries, "queries")
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            arrays = [read_user_image(q, f"query {start + i}") for i, q in enumerate(chunk)]
            yield from self.segment_arrays(arrays, supports, return_probabilities)

    def segment_arrays(
        self, images: Sequence[np.ndarray], supports: Supports, return_probabilities: bool = False
    ) -> list[np.ndarray]:
        """One forward pass over already read ``[H, W, 3]`` uint8 RGB images (see :meth:`segment`)."""
        prepared = [self._transform(img, np.full(img.shape[:2], IGNORE_INDEX, np.uint8)) for img in images]
        # uint8 to the device, normalised there: as a loader's batch in the LightningModules.
        batch = normalize_images(torch.stack([image_tensor(img) for img, _, _ in prepared]).to(self.device))
        valid = torch.tensor([v for _, _, v in prepared])
        with self._inference():
            out = self._queries(batch, supports.encoding)
        # Resized to each image's size on the CPU: a large image is never held at full size on the device.
        maps = resize_to_labels(out["foreground"].float().cpu(), valid, [img.shape[:2] for img in images])
        if return_probabilities:
            return [m.clamp(0.0, 1.0).numpy().astype(np.float32) for m in maps]
        return [(m > THRESHOLD).numpy().astype(np.uint8) for m in maps]

    def _inference(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack


def _resolve_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available here; use 'cpu' or 'auto'")
    return str(device)


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, os.PathLike, np.ndarray, Image.Image)):  # one item
        return [items]
    try:
        return list(items)
    except TypeError:
        raise DatasetError(f"{what}: expected a list of images, got {type(items).__name__}") from None


def recorded_image_size(ckpt: Mapping[str, Any]) -> int | None:
    """The model input size a Lightning checkpoint was trained at (its data record or run config)."""
    data = (ckpt.get(PROVENANCE_KEY) or {}).get("data") or {}
    if data.get("image_size"):
        return int(data["image_size"])
    config = (ckpt.get(PROVENANCE_KEY) or {}).get("config") or {}
    size = ((config.get("data") or {}).get("init_args") or {}).get("image_size")
    return int(size) if size else None


def _from_lightning(ckpt: Mapping[str, Any], path: str) -> tuple[nn.Module, nn.Module, MaskMatching, int]:
    stage = checkpoint_stage(ckpt)
    if stage != "mm":
        raise CheckpointError(
            f"checkpoint {path!r} is a stage-1 ({STAGE_CLASS.get(stage, stage)}) checkpoint: segmenting "
            "needs a stage-2 (MMModule) checkpoint, e.g. .../<run>-stage2-1shot/checkpoints/last.ckpt"
        )
    hp = ckpt.get("hyper_parameters") or {}
    backbone_cfg = coerce(BackboneConfig, hp.get("backbone")) or BackboneConfig()
    pos_cfg = coerce(POSConfig, hp.get("pos")) or POSConfig()
    mm_cfg = coerce(MaskMatchingConfig, hp.get("mm")) or MaskMatchingConfig()
    backbone, pos, mm = _build(backbone_cfg, pos_cfg, mm_cfg)
    state = ckpt["state_dict"]
    for prefix, module in (("backbone.", backbone), ("pos.", pos), ("mm.", mm)):
        part = {
            k.removeprefix(prefix): v
            for k, v in state.items()
            if k.startswith(prefix) and not k.endswith("num_batches_tracked")
        }
        result = module.load_state_dict(part, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint {path!r} does not fit the networks its hyper-parameters describe: "
                f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
    return backbone, pos, mm, recorded_image_size(ckpt) or PAPER_IMAGE_SIZE


def _from_reference(ckpt: Mapping[str, Any], path: str) -> tuple[nn.Module, nn.Module, MaskMatching]:
    try:
        state = unwrap_state_dict(ckpt, path)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r}: {err}") from err
    if not has_mask_matching(state):
        raise CheckpointError(
            f"checkpoint {path!r} holds no Mask Matching weights (a stage-1 model or not an MM-Former file): "
            "segmenting needs a stage-2 checkpoint"
        )
    try:
        backbone_cfg = BackboneConfig(name=reference_backbone_name(state))
        backbone, pos, mm = _build(backbone_cfg, POSConfig(), MaskMatchingConfig())
        load_reference_checkpoint(state, backbone=backbone, pos=pos, mask_matching=mm)
    except CheckpointMismatchError as err:
        raise CheckpointError(f"reference checkpoint {path!r} does not fit MM-Former: {err}") from err
    return backbone, pos, mm


def _build(
    backbone_cfg: BackboneConfig, pos: POSConfig, mm: MaskMatchingConfig
) -> tuple[nn.Module, nn.Module, MaskMatching]:
    """The stage-2 networks, without weights (they come from the checkpoint)."""
    backbone = build_backbone(
        backbone_cfg.name, weights=None, frozen_bn=True, pyramid_channels=backbone_cfg.pyramid_channels
    )
    return (
        backbone,
        build_pos(pos, backbone.out_channels),
        build_mask_matching(mm, backbone.out_channels, pos.num_queries),
    )


__all__ = ["Segmenter", "Supports", "recorded_image_size"]
