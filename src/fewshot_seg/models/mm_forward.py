"""The few-shot forward pass, split where the supports end: one code path for training, test, predict and
:class:`fewshot_seg.Segmenter`.

``encode_supports`` runs what depends on the supports alone (the frozen backbone, Self-Alignment, the
1x1 reductions, the mask and positional maps of Mask Matching); ``segment_queries`` runs the rest on a
batch of queries. ``MMModule`` calls both on every episode batch; ``Segmenter`` encodes a support set
once and reuses it for every query batch, so both produce the same maps by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshot_seg.models.mask_matching import MaskMatching, SupportEncoding


def encode_supports(
    backbone: nn.Module, mask_matching: MaskMatching, images: Tensor, masks: Tensor
) -> SupportEncoding:
    """Encode Bs support sets of K shots.

    Args:
        backbone: the frozen backbone (run under ``no_grad``).
        mask_matching: the Mask Matching head (its support branch keeps its graph when training).
        images: ``[Bs, K, 3, H, W]`` normalised support images.
        masks: ``[Bs, K, H, W]`` in {0, 1, 255}.

    Returns:
        The :class:`SupportEncoding` that :func:`segment_queries` takes (Bs = 1 serves any query batch).
    """
    bs, k = images.shape[:2]
    with torch.no_grad():
        feats = backbone(images.flatten(0, 1))  # one pass for all Bs*K supports
    feats = {name: f.unflatten(0, (bs, k)) for name, f in feats.items()}
    per_shot = [{name: f[:, i] for name, f in feats.items()} for i in range(k)]
    return mask_matching.encode_supports(per_shot, masks)


@torch.no_grad()
def propose(backbone: nn.Module, pos: nn.Module, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The frozen part on the queries: backbone features and POS mask logits ``[B, N, Hp/4, Wp/4]``."""
    feats = backbone(images)
    return feats, pos(feats)["pred_masks"]


def segment_queries(
    backbone: nn.Module,
    pos: nn.Module,
    mask_matching: MaskMatching,
    images: Tensor,
    supports: SupportEncoding,
) -> dict[str, Tensor]:
    """Mask Matching outputs for a batch of queries against encoded supports.

    Args:
        images: ``[B, 3, H, W]`` normalised queries (padded to the model input size).
        supports: from :func:`encode_supports`, of batch B or 1.

    Returns:
        ``foreground [B, H, W]`` (the merged map at the input size; foreground where > 0.5),
        ``similarity [B, N]``, ``coeff [B, N]``, ``proposals [B, N, Hp/4, Wp/4]`` (see ``MaskMatching``).
    """
    feats, logits = propose(backbone, pos, images)
    hw = (images.shape[-2], images.shape[-1])
    return mask_matching.match(feats, supports, logits.float(), image_size=hw)
