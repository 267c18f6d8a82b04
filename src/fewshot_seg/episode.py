"""The batch contract shared by every episode DataModule and both LightningModules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

IGNORE_INDEX = 255
"""Label value that is never scored nor used as a target (object boundaries, padding, novel classes)."""

# ImageNet statistics on the 0-255 scale (SPEC §2): images are RGB, normalised with these.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 RGB ``[..., 3, H, W]`` -> float32 ``(x - PIXEL_MEAN) / PIXEL_STD`` on the images' device.

    The one normalisation of the project: loaders ship uint8 (a quarter of the bytes across the worker
    boundary and the host-to-device copy) and the model's ``on_after_batch_transfer`` / the Segmenter
    call this. Subtraction then division in float32, so the values are bit-identical to a float32
    table of ``(v - mean) / std`` for v in 0..255.
    """
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() - mean) / std


@dataclass
class EpisodeBatch:
    """A batch of B few-shot episodes with K supports each, all at the model's input size H x W.

    K is 0 in the training batches of a model that trains on the query alone (stage 1,
    ``fewshot_seg.contracts.SupportsModel``): ``support_images`` is then ``[B, 0, 3, H, W]``,
    ``support_masks`` ``[B, 0, H, W]`` and ``support_ids`` B empty lists.

    Images and labels travel as uint8 (DataModules, across the loader worker boundary and to the
    device: a quarter of float32 images', an eighth of int64 labels' bytes); the stage modules convert
    them once, on the device, in ``on_after_batch_transfer`` (:meth:`normalized`,
    :func:`normalize_images`): from then on images are float32 and labels int64.

    Attributes:
        query_image: ``[B, 3, H, W]`` uint8 RGB from a loader; float32 normalised with ``PIXEL_MEAN`` /
            ``PIXEL_STD`` once normalised.
        query_mask: ``[B, H, W]`` in {0, 1, 255}: 1 = the episode class, 255 = ignore (uint8 from a
            loader, int64 once normalised, as every label below).
        support_images: ``[B, K, 3, H, W]``, the same type as the query.
        support_masks: ``[B, K, H, W]`` in {0, 1, 255}.
        class_id: ``[B]`` int64, global 1-based class id of the episode class.
        query_semantic: ``[B, H, W]``, the query's semantic label for stage-1 targets:
            0 = background, 1..C = global class ids, 255 = ignore; novel classes of the fold are 255.
        query_valid_size: ``[B, 2]`` int64 (h, w): the extent of real image content inside the
            (possibly padded) ``H x W`` query tensor, top-left aligned. Predictions are cropped to it
            before being resized to the original label size.
        query_label_orig: B tensors ``[h_i, w_i]`` in {0, 1, 255}: the binary query label the
            evaluation protocol scores (SPEC §6): at the original image size, untouched by any transform,
            or (square protocols such as ``square480`` / ``mmformer``) resized to the model input.
        query_id: B image ids of the queries.
        support_ids: B lists of K image ids of the supports.
        query_label_values: B tuples, the sorted distinct values of ``query_semantic`` (255 excluded),
            read on the host by :func:`collate_episodes` (in the loader workers): the stage-1 targets are
            then built on the device without a host sync (``fewshot_seg.models.targets``). None when the
            batch was not collated here.
    """

    query_image: Tensor
    query_mask: Tensor
    support_images: Tensor
    support_masks: Tensor
    class_id: Tensor
    query_semantic: Tensor
    query_valid_size: Tensor
    query_label_orig: list[Tensor] = field(default_factory=list)
    query_id: list[str] = field(default_factory=list)
    support_ids: list[list[str]] = field(default_factory=list)
    query_label_values: list[tuple[int, ...]] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.query_image.shape[0])

    @property
    def shot(self) -> int:
        return int(self.support_images.shape[1])

    @property
    def original_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of each query's original label."""
        return [(int(t.shape[0]), int(t.shape[1])) for t in self.query_label_orig]

    def normalized(self) -> EpisodeBatch:
        """The batch as the models take it: uint8 images normalised (:func:`normalize_images`), uint8
        labels widened to int64; tensors already float / int64 are kept."""

        def norm(images: Tensor) -> Tensor:
            return normalize_images(images) if images.dtype == torch.uint8 else images

        def widen(label: Tensor) -> Tensor:
            return label.long() if label.dtype == torch.uint8 else label

        return replace(
            self,
            query_image=norm(self.query_image),
            support_images=norm(self.support_images),
            query_mask=widen(self.query_mask),
            support_masks=widen(self.support_masks),
            query_semantic=widen(self.query_semantic),
            query_label_orig=[widen(t) for t in self.query_label_orig],
        )

    def _map(self, fn: Callable[[Tensor], Tensor]) -> EpisodeBatch:
        """A copy with ``fn`` applied to every tensor."""
        return EpisodeBatch(
            query_image=fn(self.query_image),
            query_mask=fn(self.query_mask),
            support_images=fn(self.support_images),
            support_masks=fn(self.support_masks),
            class_id=fn(self.class_id),
            query_semantic=fn(self.query_semantic),
            query_valid_size=fn(self.query_valid_size),
            query_label_orig=[fn(t) for t in self.query_label_orig],
            query_id=list(self.query_id),
            support_ids=[list(s) for s in self.support_ids],
            query_label_values=self.query_label_values,
        )

    def to(self, device: torch.device | str) -> EpisodeBatch:
        """A copy with every tensor moved to ``device``; pinned tensors are copied asynchronously
        (the copy is ordered before any later work on the device's current stream)."""
        return self._map(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def pin_memory(self) -> EpisodeBatch:
        """A copy in page-locked host memory: what a ``DataLoader(pin_memory=True)`` calls on a batch
        (without this method it would hand the batch on unpinned)."""
        return self._map(lambda t: t.pin_memory())


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without blocking, so that the copy does
    not wait for the kernels already queued (a pageable copy would: a host sync)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def collate_episodes(samples: Sequence[dict]) -> EpisodeBatch:
    """Stack per-episode dicts (keys = the ``EpisodeBatch`` fields, without the batch dimension)."""
    if not samples:
        raise ValueError("cannot collate an empty list of episodes")

    def stack(key: str) -> Tensor:
        # default_collate stacks straight into shared memory inside a loader worker; a plain
        # torch.stack would be copied there once more when the batch is sent to the main process.
        return default_collate([s[key] for s in samples])

    from fewshot_seg.models.targets import label_values  # models import this module

    query_semantic = stack("query_semantic")
    return EpisodeBatch(
        query_image=stack("query_image"),
        query_mask=stack("query_mask"),
        support_images=stack("support_images"),
        support_masks=stack("support_masks"),
        class_id=torch.as_tensor([int(s["class_id"]) for s in samples], dtype=torch.long),
        query_semantic=query_semantic,
        query_valid_size=torch.stack([torch.as_tensor(s["query_valid_size"]) for s in samples]).long(),
        query_label_orig=[torch.as_tensor(s["query_label_orig"]) for s in samples],
        query_id=[str(s["query_id"]) for s in samples],
        support_ids=[[str(i) for i in s["support_ids"]] for s in samples],
        query_label_values=label_values(query_semantic),
    )


def image_tensor(image: np.ndarray) -> Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[3, H, W]`` uint8 (channels first; normalised later, on the model's
    device, by :func:`normalize_images`)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
