"""Proposal upsampling, soft IoU and proposal selection (oracle / heuristic baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_seg.models.backbone_base import STRIDES

SOFT_IOU_EPS = 1e-7
PROPOSAL_STRIDE = STRIDES["res2"]
"""The POS proposals' stride: its mask features are the pixel decoder's res2 level."""


def upsample_to_image(maps: Tensor, image_size: tuple[int, int], stride: int = PROPOSAL_STRIDE) -> Tensor:
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


def _upsample_matrix(size: int, stride: int, keep: int, device: torch.device) -> Tensor:
    """``[size, keep]`` matrix A^T of 1-D linear upsampling by ``stride`` (align_corners=False), cropped.

    Row ``i`` is the upsampled unit impulse at ``i``; PyTorch's bilinear resize is separable, so a 2-D
    upsample-and-crop is ``A_h p A_w^T`` with these matrices.
    """
    eye = torch.eye(size, device=device)[None]  # [1, size, size]: channel i = impulse at i
    up = F.interpolate(eye, size=size * stride, mode="linear", align_corners=False)[0]
    return up[:, :keep]


@torch.no_grad()
def proposal_soft_iou(proposals: Tensor, label: Tensor, stride: int = PROPOSAL_STRIDE) -> Tensor:
    """``soft_iou(upsample_to_image(proposals), label)`` without materialising the upsampled stack.

    Upsample-and-crop is a linear map ``U p = A_h p A_w^T``, so ``sum(t * U p) = sum(A_h^T t A_w * p)``
    and ``sum(U p) = sum(A_h^T 1 A_w * p)``: two low-resolution maps per image instead of N
    full-resolution ones (100 x 480 x 480 per image at the paper's size). Plain tensor algebra, so it
    also runs under ``torch.inference_mode``.

    Args:
        proposals: ``[B, N, h, w]`` probabilities on the padded stride-``stride`` grid.
        label: ``[B, H, W]`` in ``{0, 1, 255}``.

    Returns:
        ``[B, N]`` soft IoUs.
    """
    h, w = proposals.shape[-2:]
    big_h, big_w = label.shape[-2], label.shape[-1]
    t = binary_target(label)
    a_h = _upsample_matrix(h, stride, big_h, label.device)  # [h, H]
    a_w = _upsample_matrix(w, stride, big_w, label.device)  # [w, W]
    both = torch.stack([t, torch.ones_like(t)], 1)  # [B, 2, H, W]
    adj = torch.einsum("ih,bkhw,jw->bkij", a_h, both, a_w)  # [B, 2, h, w]
    p = proposals.float()
    inter = torch.einsum("bnhw,bhw->bn", p, adj[:, 0])
    sum_p = torch.einsum("bnhw,bhw->bn", p, adj[:, 1])
    union = t.sum((1, 2))[:, None] + sum_p - inter
    return inter / (union + SOFT_IOU_EPS)


@torch.no_grad()
def oracle_select(proposals: Tensor, label: Tensor, stride: int = PROPOSAL_STRIDE) -> tuple[Tensor, Tensor]:
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
    proposals: Tensor, index: Tensor, image_size: tuple[int, int], stride: int = PROPOSAL_STRIDE
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
