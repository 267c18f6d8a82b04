"""Point sampling helpers (PointRend style) used by the stage-1 matcher and criterion.

Coordinates are ``(x, y)`` in ``[0, 1]``, x along the width, with the ``grid_sample(align_corners=False)``
convention: pixel ``j`` of a width-``W`` map has its centre at ``(j + 0.5) / W``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(inputs: Tensor, point_coords: Tensor) -> Tensor:
    """Bilinearly sample ``inputs`` at normalised points (zeros outside the map).

    Args:
        inputs: ``[N, C, H, W]`` maps.
        point_coords: ``[N, P, 2]`` points ``(x, y)`` in ``[0, 1]``.

    Returns:
        ``[N, C, P]`` sampled values.
    """
    # grid_sample wants [-1, 1] coordinates laid out as an [N, 1, P, 2] "image" of points.
    grid = (2.0 * point_coords - 1.0).unsqueeze(1)
    out = F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False)
    return out.squeeze(2)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of mask logits: ``-|logit|`` (largest at the decision boundary)."""
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    oversampled_coords: Tensor | None = None,
    random_perm: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose ``num_points`` points per mask, biased towards uncertain logits.

    ``int(oversample_ratio * P)`` candidate points are drawn uniformly; the
    ``int(importance_sample_ratio * P)`` most uncertain ones (``-|logit|``) are kept, and the remaining
    points are taken from the other candidates (sorted by increasing uncertainty) through one random
    permutation shared by all masks — the variant used by the reference criterion.

    Args:
        logits: ``[n, 1, h, w]`` mask logits (read only; no gradient flows through the choice).
        num_points: P.
        oversample_ratio: candidates per point.
        importance_sample_ratio: fraction of P taken by uncertainty.
        oversampled_coords: optional injected candidates ``[n, int(ratio*P), 2]`` (tests / parity).
        random_perm: optional injected permutation indices ``[P - int(importance*P)]`` into the sorted
            remaining candidates; or ``[G, ...]``, one permutation per group of ``n / G`` consecutive masks
            (the criterion's decoder layers, each with its own draw).
        generator: random generator for the draws that are not injected (default: global RNG).

    Returns:
        ``[n, P, 2]`` point coordinates.
    """
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if oversampled_coords is None:
        oversampled_coords = torch.rand(num_masks, num_sampled, 2, device=logits.device, generator=generator)
    oversampled_coords = oversampled_coords.to(device=logits.device, dtype=torch.float32)
    with torch.no_grad():
        point_logits = point_sample(logits.detach().float(), oversampled_coords)  # [n, 1, 3P]
        uncertainty = logit_uncertainty(point_logits[:, 0, :])
        idx_uncertain = uncertainty.topk(num_uncertain, dim=1).indices
        # The rest, least uncertain first (topk largest=False returns them sorted ascending).
        idx_rest = uncertainty.topk(num_sampled - num_uncertain, dim=1, largest=False).indices
    if random_perm is None:
        random_perm = torch.randperm(num_sampled - num_uncertain, device=logits.device, generator=generator)
    random_perm = random_perm[..., :num_random].to(logits.device)
    if random_perm.dim() == 1:
        chosen = idx_rest[:, random_perm]
    else:  # per group: the same rows of idx_rest as indexing with each group's permutation
        groups = random_perm.shape[0]
        rest = idx_rest.view(groups, num_masks // max(groups, 1), idx_rest.shape[1])
        chosen = rest.gather(2, random_perm[:, None, :].expand(-1, rest.shape[1], -1)).flatten(0, 1)
    idx = torch.cat([idx_uncertain, chosen], dim=1)
    return torch.gather(oversampled_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
