"""Proposal upsampling, soft IoU and proposal selection (oracle / heuristic baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
SOFT_IOU_EPS = 1e-7


def upsample_to_image(maps: Tensor, image_size: tuple[int, int], stride: int = 4) -> Tensor:
    """Bring stride-``stride`` maps of the padded image back to the unpadded image.

    Bilinear upsampling by the stride (align_corners=False) to the padded size, then a crop to
    ``image_size`` (the Mask2Former way; cropping first keeps the padding out of any later resize).

    Args:
        maps: ``[B, C, h, w]`` maps covering the padded image ``(stride*h, stride*w)``.
        image_size: unpadded ``(H, W)``, at most the padded size.

    Returns:
        ``[B, C, H, W]``.
    """
    h, w = maps.shape[-2:]
    out = F.interpolate(maps, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return out[..., : image_size[0], : image_size[1]]


def binary_target(label: Tensor) -> Tensor:
    """``{0, 1, 255}`` label -> float ``{0, 1}`` target with 255 mapped to background (training losses)."""
    return (label == 1).float()


def soft_iou(proposal_probs: Tensor, label: Tensor) -> Tensor:
    """Soft IoU of every proposal against a binary label.

    Args:
        proposal_probs: ``[B, N, H, W]`` probabilities at the label size.
        label: ``[B, H, W]`` in ``{0, 1, 255}`` (255 counts as background).

    Returns:
        ``[B, N]`` ``sum(t*p) / (sum t + sum p - sum(t*p) + 1e-7)``.
    """
    t = binary_target(label).to(proposal_probs.dtype)
    inter = torch.einsum("bnhw,bhw->bn", proposal_probs, t)
    union = t.sum((1, 2))[:, None] + proposal_probs.sum((2, 3)) - inter
    return inter / (union + SOFT_IOU_EPS)


@torch.no_grad()
def proposal_soft_iou(proposals: Tensor, label: Tensor, stride: int = 4) -> Tensor:
    """``soft_iou(upsample_to_image(proposals), label)`` without materialising the upsampled stack.

    Upsample-and-crop is a linear map U, so ``sum(t * U p) = sum(U^T t * p)`` and
    ``sum(U p) = sum(U^T 1 * p)``: only two low-resolution maps per image are needed instead of N
    full-resolution ones (100 x 480 x 480 per image at the paper's size). U^T is applied as the
    gradient of U. No gradient flows (the IoU is only used to pick proposals).

    Args:
        proposals: ``[B, N, h, w]`` probabilities on the padded stride-``stride`` grid.
        label: ``[B, H, W]`` in ``{0, 1, 255}``.

    Returns:
        ``[B, N]`` soft IoUs.
    """
    b, _, h, w = proposals.shape
    image_size = (label.shape[-2], label.shape[-1])
    t = binary_target(label)
    with torch.enable_grad(), torch.autocast(device_type=proposals.device.type, enabled=False):
        probe = torch.zeros(b, 2, h, w, device=proposals.device, requires_grad=True)
        up = upsample_to_image(probe, image_size, stride)
        (adj,) = torch.autograd.grad(up, probe, grad_outputs=torch.stack([t, torch.ones_like(t)], 1))
    p = proposals.float()
    inter = torch.einsum("bnhw,bhw->bn", p, adj[:, 0])
    sum_p = torch.einsum("bnhw,bhw->bn", p, adj[:, 1])
    union = t.sum((1, 2))[:, None] + sum_p - inter
    return inter / (union + SOFT_IOU_EPS)


@torch.no_grad()
def oracle_select(proposals: Tensor, label: Tensor, stride: int = 4) -> tuple[Tensor, Tensor]:
    """Oracle: the proposal with the highest soft IoU against the ground truth (paper-time arg-max).

    Args:
        proposals: ``[B, N, h, w]`` sigmoid probabilities on the padded stride-4 grid.
        label: ``[B, H, W]`` in ``{0, 1, 255}`` at the unpadded image size.

    Returns:
        ``(index [B], ious [B, N])``.
    """
    ious = proposal_soft_iou(proposals, label, stride)
    return ious.argmax(dim=1), ious


def top_cosine_select(similarity: Tensor) -> Tensor:
    """Heuristic baseline: the proposal with the highest cosine similarity ``[B, N] -> [B]``."""
    return similarity.argmax(dim=1)


def selected_foreground(
    proposals: Tensor, index: Tensor, image_size: tuple[int, int], stride: int = 4
) -> Tensor:
    """Foreground probability map of one chosen proposal per image.

    Args:
        proposals: ``[B, N, h, w]`` probabilities on the padded stride-4 grid.
        index: ``[B]`` chosen proposal per image.
        image_size: unpadded ``(H, W)``.

    Returns:
        ``[B, H, W]``; foreground where > 0.5.
    """
    chosen = proposals[torch.arange(proposals.shape[0], device=proposals.device), index.to(proposals.device)]
    return upsample_to_image(chosen[:, None], image_size, stride)[:, 0]
