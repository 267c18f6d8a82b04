"""Training losses: POS (stage 1) and Mask Matching (stage 2), plus the dice helpers they share.

Point-coordinate injection (``POSCriterion``): ``point_coords`` is a list with one dict per prediction
layer, in processing order ``[final, aux_0, aux_1, ...]``. Each dict may hold

* ``"matcher"``: ``[B, P, 2]`` the uniform points of the Hungarian matcher (one set per image);
* ``"loss"``: ``[n_matched, P, 2]`` the exact loss points, rows ordered like the matched pairs
  (image 0 first, prediction indices ascending);
* or, instead of ``"loss"``, ``"loss_oversampled"`` ``[n_matched, 3P, 2]`` and ``"loss_perm"`` ``[P/4]``,
  the two random draws of the importance sampling.

Missing entries are drawn at random, in the reference's order (final first; per layer matcher image by
image, then the loss), from ``generator`` or the global RNG — so seeding the global RNG before the call
reproduces the reference's draws as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.episode import IGNORE_INDEX
from fewshot_seg.models.matcher import HungarianMatcher
from fewshot_seg.models.point_sampling import get_uncertain_point_coords_with_randomness, point_sample
from fewshot_seg.models.selection import (
    binary_target,
    oracle_select,
    proposal_soft_iou,
    selected_foreground,
)


def semantic_to_targets(semantic: Tensor) -> dict[str, Tensor]:
    """One binary target per distinct label value (background 0 included, 255 excluded).

    Args:
        semantic: ``[H, W]`` integer label map.

    Returns:
        ``{"masks": [M, H, W] bool, "labels": [M] int64}`` sorted by value.
    """
    values = torch.unique(semantic)
    values = values[values != IGNORE_INDEX]
    masks = semantic[None] == values[:, None, None]
    return {"masks": masks, "labels": values.long()}


def two_channel_dice_loss(foreground: Tensor, label: Tensor) -> Tensor:
    """Reference ``WeightedDiceLoss`` on ``[1 - fg, fg]`` (unweighted).

    A sigmoid is applied to the two channels (as the reference does, although ``fg`` is already a
    probability-like map); targets ``[label == 0, label == 1]`` with 255 -> background. Per sample and channel
    ``1 - 2 sum(p t) / max(sum p^2 + sum t^2, 1e-8)``; summed over channels, averaged over the batch.

    Args:
        foreground: ``[B, H, W]`` merged foreground map.
        label: ``[B, H, W]`` in {0, 1, 255}.

    Returns:
        scalar.
    """
    fg = foreground.float()
    probs = torch.stack([1 - fg, fg], 1).sigmoid().flatten(2)
    t1 = binary_target(label).flatten(1)
    target = torch.stack([1 - t1, t1], 1)
    inter = (probs * target).sum(-1)
    denom = (probs.pow(2).sum(-1) + target.pow(2).sum(-1)).clamp_min(1e-8)
    return (1 - 2 * inter / denom).sum(1).mean()


def point_bce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of the mean point sigmoid-BCE, divided by ``num_masks`` (``[n, P]`` inputs)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks


def point_dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of ``1 - (2 sum(sig t) + 1) / (sum sig + sum t + 1)``, divided by ``num_masks``."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def _global_num_masks(count: int, device: torch.device) -> float:
    """Targets per process averaged over processes (sum / world size, as Mask2Former), at least 1.

    DDP averages gradients over processes, so normalising by the average keeps the loss scale of a
    single-process run.
    """
    num = torch.as_tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(float(num.item()), 1.0)


class POSCriterion(nn.Module):
    """Stage-1 loss of the Potential Objects Segmenter (SPEC §3).

    Per prediction layer: Hungarian matching, then point-sampled sigmoid-BCE and dice on the matched pairs
    (importance sampling), each normalised by the number of targets; plus a few-shot dice term on the final
    proposal with the highest soft IoU against the sampled class's binary label.

    Args:
        mask_weight: weight of the BCE terms.
        dice_weight: weight of the dice terms.
        fewshot_weight: weight of the few-shot dice term.
        num_points: points per mask for matching and for the losses.
        oversample_ratio: PointRend oversampling.
        importance_sample_ratio: fraction of uncertainty-chosen points.
        stride: stride of the mask logits w.r.t. the padded image.
    """

    def __init__(
        self,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        fewshot_weight: float = 10.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        stride: int = 4,
    ) -> None:
        super().__init__()
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.fewshot_weight = fewshot_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.stride = stride
        self.matcher = HungarianMatcher(mask_weight, dice_weight, num_points)

    def _pad_targets(self, masks: Tensor, pred_hw: tuple[int, int]) -> Tensor:
        """Zero-pad ``[M, H, W]`` targets to the padded image the logits cover (point coordinates agree)."""
        hp, wp = pred_hw[0] * self.stride, pred_hw[1] * self.stride
        h, w = masks.shape[-2:]
        if (h, w) == (hp, wp):
            return masks
        return F.pad(masks.float(), (0, wp - w, 0, hp - h))

    def _layer_losses(
        self,
        pred_masks: Tensor,
        target_masks: list[Tensor],
        num_masks: float,
        coords: dict[str, Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, dict[str, object]]:
        indices = self.matcher(pred_masks, target_masks, coords.get("matcher"), generator)
        device = pred_masks.device
        src = torch.cat([pred_masks[b, i.to(device)] for b, (i, _) in enumerate(indices)])  # [n, h, w]
        tgt = torch.cat([target_masks[b][j.to(device)] for b, (_, j) in enumerate(indices)])  # [n, H, W]
        src = src.float()[:, None]
        with torch.no_grad():
            point_coords = coords.get("loss")
            if point_coords is None:
                point_coords = get_uncertain_point_coords_with_randomness(
                    src,
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                    oversampled_coords=coords.get("loss_oversampled"),
                    random_perm=coords.get("loss_perm"),
                    generator=generator,
                )
            point_coords = point_coords.to(device=device, dtype=torch.float32)
            point_labels = point_sample(tgt.float()[:, None], point_coords)[:, 0]
        point_logits = point_sample(src, point_coords)[:, 0]
        loss_mask = point_bce_loss(point_logits, point_labels, num_masks)
        loss_dice = point_dice_loss(point_logits, point_labels, num_masks)
        return loss_mask, loss_dice, {"indices": indices, "loss_point_coords": point_coords}

    def fewshot_term(self, pred_masks: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unweighted few-shot dice on the best proposal.

        Args:
            pred_masks: ``[B, N, h, w]`` final logits.
            label: ``[B, H, W]`` {0, 1, 255} binary label of the sampled class.

        Returns:
            ``(dice scalar, index [B], ious [B, N])``.
        """
        probs = pred_masks.float().sigmoid()
        index, ious = oracle_select(probs, label, self.stride)
        fg = selected_foreground(probs, index, (label.shape[-2], label.shape[-1]), self.stride)
        return two_channel_dice_loss(fg, label), index, ious

    def compute(
        self,
        pos_out: dict,
        targets: list[dict[str, Tensor]],
        fewshot_label: Tensor | None = None,
        point_coords: list[dict[str, Tensor]] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, object]]:
        """Losses and diagnostics.

        Returns:
            ``(weighted losses, details)``; details hold ``unweighted`` losses, ``num_masks``, per-layer
            ``layers`` (indices and the loss points used) and, with a label, ``fewshot_index`` and
            ``fewshot_ious``.
        """
        with torch.autocast(device_type=pos_out["pred_masks"].device.type, enabled=False):
            layers = [pos_out["pred_masks"]] + [a["pred_masks"] for a in pos_out.get("aux_outputs", [])]
            suffixes = [""] + [f"_{i}" for i in range(len(layers) - 1)]
            pred_hw = tuple(layers[0].shape[-2:])
            target_masks = [self._pad_targets(t["masks"].to(layers[0].device), pred_hw) for t in targets]
            num_masks = _global_num_masks(sum(int(t.shape[0]) for t in target_masks), layers[0].device)
            losses: dict[str, Tensor] = {}
            unweighted: dict[str, Tensor] = {}
            layer_details = []
            for li, (pred, suffix) in enumerate(zip(layers, suffixes)):
                coords = point_coords[li] if point_coords is not None else {}
                loss_mask, loss_dice, info = self._layer_losses(
                    pred, target_masks, num_masks, coords, generator
                )
                unweighted[f"loss_mask{suffix}"] = loss_mask
                unweighted[f"loss_dice{suffix}"] = loss_dice
                losses[f"loss_mask{suffix}"] = self.mask_weight * loss_mask
                losses[f"loss_dice{suffix}"] = self.dice_weight * loss_dice
                layer_details.append(info)
            details: dict[str, object] = {
                "unweighted": unweighted,
                "num_masks": num_masks,
                "layers": layer_details,
            }
            if fewshot_label is not None:
                dice, index, ious = self.fewshot_term(layers[0], fewshot_label.to(layers[0].device))
                unweighted["loss_fewshot"] = dice
                losses["loss_fewshot"] = self.fewshot_weight * dice
                details["fewshot_index"] = index
                details["fewshot_ious"] = ious
        return losses, details

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Weighted scalar losses: the first result of :meth:`compute` (same arguments).

        Returns:
            ``loss_mask``, ``loss_dice``, ``loss_mask_{i}``, ``loss_dice_{i}`` and ``loss_fewshot``.
        """
        return self.compute(*args, **kwargs)[0]


class MaskMatchingCriterion(nn.Module):
    """Stage-2 loss (SPEC §3): ``dice_weight * L_M + contrastive_weight * L_co``.

    L_M = two-channel dice of the merged foreground; L_co = BCE of the min-max normalised cosine
    similarities at the proposals with the lowest (target 0) and highest (target 1) soft IoU (detached).

    Args:
        dice_weight: weight of L_M.
        contrastive_weight: weight of L_co.
        stride: stride of the proposals w.r.t. the padded image.
    """

    def __init__(self, dice_weight: float = 10.0, contrastive_weight: float = 6.0, stride: int = 4) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.contrastive_weight = contrastive_weight
        self.stride = stride

    def compute(self, mm_out: dict, query_mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted losses and diagnostics (unweighted values, IoUs, chosen indices, normalised S)."""
        fg = mm_out["foreground"]
        with torch.autocast(device_type=fg.device.type, enabled=False):
            query_mask = query_mask.to(fg.device)
            dice = two_channel_dice_loss(fg, query_mask)
            ious = proposal_soft_iou(mm_out["proposals"].detach().float(), query_mask, self.stride)
            iou_argmin, iou_argmax = ious.argmin(dim=1), ious.argmax(dim=1)
            sim = mm_out["similarity"].float()
            s_min = sim.min(dim=1, keepdim=True).values
            s_max = sim.max(dim=1, keepdim=True).values
            s_hat = (sim - s_min) / (s_max - s_min + 1e-8)
            em = torch.stack(
                [s_hat.gather(1, iou_argmin[:, None])[:, 0], s_hat.gather(1, iou_argmax[:, None])[:, 0]], 1
            )
            target = torch.tensor([0.0, 1.0], device=em.device).expand_as(em)
            # torch's BCE (autocast is off here): its clamped log and clamped backward stay finite when the
            # normalised similarity is exactly 0 or 1 (whenever argmin/argmax of S and of the IoU agree).
            bce = F.binary_cross_entropy(em, target)
        losses = {"loss_dice": self.dice_weight * dice, "loss_contrastive": self.contrastive_weight * bce}
        details = {
            "dice_unweighted": dice.detach(),
            "bce_unweighted": bce.detach(),
            "ious": ious,
            "iou_argmin": iou_argmin,
            "iou_argmax": iou_argmax,
            "co_em": em.detach(),
        }
        return losses, details

    def forward(self, mm_out: dict, query_mask: Tensor) -> dict[str, Tensor]:
        """Weighted losses.

        Args:
            mm_out: ``MaskMatching`` output (``foreground [B, H, W]``, ``similarity [B, N]``,
                ``proposals [B, N, h, w]``).
            query_mask: ``[B, H, W]`` {0, 1, 255} binary query label at the image size.

        Returns:
            ``{"loss_dice": 10 * L_M, "loss_contrastive": 6 * BCE}``.
        """
        return self.compute(mm_out, query_mask)[0]
