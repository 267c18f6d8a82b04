"""Hungarian matching of POS mask proposals to ground-truth masks (stage 1, no class term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fewshot_seg.models.point_sampling import point_sample


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid-BCE over points between every prediction and every target.

    Args:
        inputs: ``[Q, P]`` logits.
        targets: ``[n, P]`` values in ``[0, 1]``.

    Returns:
        ``[Q, n]`` costs.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    # BCE is linear in the target, so all pairs come from two matrix products.
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice cost ``1 - (2 sum(sig*t) + 1) / (sum sig + sum t + 1)`` for every pair.

    Args:
        inputs: ``[Q, P]`` logits.
        targets: ``[n, P]`` values in ``[0, 1]``.

    Returns:
        ``[Q, n]`` costs.
    """
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predicted masks to target masks by point-sampled BCE + dice cost.

    Runs without gradient and in float32 even under autocast (the cost feeds scipy).

    Args:
        cost_mask: weight of the BCE cost.
        cost_dice: weight of the dice cost.
        num_points: uniform random points per image, shared by all predictions and targets.
    """

    def __init__(self, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544) -> None:
        super().__init__()
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def costs(
        self, pred_masks: Tensor, target_masks: Tensor, point_coords: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Cost matrices of one image.

        Args:
            pred_masks: ``[Q, h, w]`` logits.
            target_masks: ``[n, H', W']`` binary masks covering the same extent as ``pred_masks``.
            point_coords: ``[P, 2]`` points ``(x, y)`` in ``[0, 1]``.

        Returns:
            ``(cost_mask [Q, n], cost_dice [Q, n], C [Q, n])`` with C the weighted total.
        """
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            coords = point_coords.float()
            out = point_sample(pred_masks.float()[:, None], coords[None].expand(pred_masks.shape[0], -1, -1))
            tgt = point_sample(
                target_masks.float()[:, None], coords[None].expand(target_masks.shape[0], -1, -1)
            )
            out, tgt = out[:, 0], tgt[:, 0]
            cost_mask = batch_sigmoid_ce_cost(out, tgt)
            cost_dice = batch_dice_cost(out, tgt)
            total = self.cost_mask * cost_mask + self.cost_dice * cost_dice
        return cost_mask, cost_dice, total

    @torch.no_grad()
    def forward(
        self,
        pred_masks: Tensor,
        target_masks: list[Tensor],
        point_coords: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            pred_masks: ``[B, Q, h, w]`` logits.
            target_masks: B tensors ``[n_b, H', W']`` (bool or float), same extent as the predictions.
            point_coords: optional injected ``[B, P, 2]`` points; otherwise ``rand(1, P, 2)`` is drawn per
                image, image 0 first (the reference's draw order).
            generator: random generator for the drawn points (default: global RNG).

        Returns:
            B pairs ``(pred_idx [k] ascending, tgt_idx [k])`` of int64 CPU tensors.
        """
        indices = []
        for b, tgt in enumerate(target_masks):
            if point_coords is None:
                coords = torch.rand(1, self.num_points, 2, device=pred_masks.device, generator=generator)[0]
            else:
                coords = point_coords[b].to(pred_masks.device)
            cost = self.costs(pred_masks[b], tgt.to(pred_masks.device), coords)[2]
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
