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

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.episode import IGNORE_INDEX, host_to_device
from fewshot_seg.models.matcher import HungarianMatcher
from fewshot_seg.models.point_sampling import get_uncertain_point_coords_with_randomness, point_sample
from fewshot_seg.models.selection import (
    binary_target,
    oracle_select,
    proposal_soft_iou,
    selected_foreground,
)
from fewshot_seg.models.targets import PaddedTargets


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


def point_bce_loss(
    logits: Tensor, labels: Tensor, num_masks: float | Tensor, groups: int | None = None
) -> Tensor:
    """Sum over masks of the mean point sigmoid-BCE, divided by ``num_masks``.

    Args:
        logits, labels: ``[n, P]``, or ``[G*n, P]`` for ``groups`` G equal groups (e.g. decoder layers).

    Returns:
        a scalar, or ``[G]`` with ``groups``.
    """
    per_mask = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return _group_sum(per_mask, groups) / num_masks


def point_dice_loss(
    logits: Tensor, labels: Tensor, num_masks: float | Tensor, groups: int | None = None
) -> Tensor:
    """Sum over masks of ``1 - (2 sum(sig t) + 1) / (sum sig + sum t + 1)``, divided by ``num_masks``
    (shapes as :func:`point_bce_loss`)."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return _group_sum(1 - (numerator + 1) / (denominator + 1), groups) / num_masks


def _group_sum(per_mask: Tensor, groups: int | None) -> Tensor:
    return (
        per_mask.sum()
        if groups is None
        else per_mask.view(groups, per_mask.shape[0] // max(groups, 1)).sum(1)
    )


def _global_num_masks(count: int, device: torch.device) -> float | Tensor:
    """Targets per process averaged over processes (sum / world size, as Mask2Former), at least 1.

    DDP averages gradients over processes, so normalising by the average keeps the loss scale of a
    single-process run. ``count`` is known on the host (:class:`PaddedTargets`), so a single process
    needs no device work; under DDP the average stays a device tensor (no host sync).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(count), 1.0)
    num = torch.as_tensor(float(count), device=device)
    dist.all_reduce(num)
    return (num / dist.get_world_size()).clamp_min(1.0)


def _as_padded(targets: PaddedTargets | Sequence[dict[str, Tensor]]) -> PaddedTargets:
    return targets if isinstance(targets, PaddedTargets) else PaddedTargets.from_list(targets)


class POSCriterion(nn.Module):
    """Stage-1 loss of the Potential Objects Segmenter (SPEC §3).

    Per prediction layer: Hungarian matching, then point-sampled sigmoid-BCE and dice on the matched pairs
    (importance sampling), each normalised by the number of targets; plus a few-shot dice term on the final
    proposal with the highest soft IoU against the sampled class's binary label.

    All layers and images are processed together: the cost matrices in a few batched operations and one
    device-to-host copy (:meth:`HungarianMatcher.match_layers`), the loss points, BCE and dice of every
    matched pair of every layer in one pass. The random points are drawn first, layer by layer in the
    reference's order (matcher points image by image, then the loss draws), so they are the points the
    per-layer loop drew.

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
        """Zero-pad ``[B, M, H, W]`` targets to the padded image the logits cover (point coordinates
        agree)."""
        hp, wp = pred_hw[0] * self.stride, pred_hw[1] * self.stride
        h, w = masks.shape[-2:]
        if (h, w) == (hp, wp):
            return masks
        padded = masks.new_zeros((*masks.shape[:2], hp, wp))
        padded[..., :h, :w] = masks
        return padded

    def _draw_points(
        self,
        num_layers: int,
        batch: int,
        num_matched: int,
        device: torch.device,
        point_coords: list[dict[str, Tensor]] | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Every random draw of the step, in the reference's order (per layer: matcher points image by
        image, then the loss candidates and the permutation); injected ``point_coords`` replace draws.

        Returns:
            ``(matcher points [L, B, P, 2], per layer {"loss"} or {"oversampled", "perm"})``.
        """
        num_sampled = int(self.num_points * self.oversample_ratio)
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        matcher: list[Tensor] = []
        loss: list[dict[str, Tensor]] = []
        for li in range(num_layers):
            coords = point_coords[li] if point_coords is not None else {}
            given = coords.get("matcher")
            if given is None:
                # One draw for the layer's B point sets: on the CPU the generator is serial, so this is the
                # reference's B draws of [1, P, 2] (image 0 first) concatenated, bit for bit.
                matcher.append(torch.rand(batch, self.num_points, 2, device=device, generator=generator))
            else:
                matcher.append(given.to(device=device, dtype=torch.float32))
            if coords.get("loss") is not None:
                loss.append({"loss": coords["loss"].to(device=device, dtype=torch.float32)})
                continue
            over = coords.get("loss_oversampled")
            if over is None:
                over = torch.rand(num_matched, num_sampled, 2, device=device, generator=generator)
            perm = coords.get("loss_perm")
            if perm is None:
                perm = torch.randperm(num_sampled - num_uncertain, device=device, generator=generator)
            loss.append({"oversampled": over.to(device=device, dtype=torch.float32), "perm": perm.to(device)})
        return torch.cat(matcher).view(num_layers, batch, self.num_points, 2), loss

    def _loss_points(self, src: Tensor, draws: list[dict[str, Tensor]], num_matched: int) -> Tensor:
        """``[L*n, P, 2]`` loss points of the matched logits ``src [L*n, 1, h, w]`` (layer-major)."""
        sampled = [li for li, d in enumerate(draws) if "loss" not in d]
        if len(sampled) == len(draws):  # the usual case: every layer samples, in one batched call
            return get_uncertain_point_coords_with_randomness(
                src,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                oversampled_coords=torch.cat([d["oversampled"] for d in draws]),
                random_perm=torch.stack([d["perm"] for d in draws]),
            )
        rows = src.split(num_matched)
        out = []
        for li, d in enumerate(draws):
            if "loss" in d:
                out.append(d["loss"])
            else:
                out.append(
                    get_uncertain_point_coords_with_randomness(
                        rows[li],
                        self.num_points,
                        self.oversample_ratio,
                        self.importance_sample_ratio,
                        oversampled_coords=d["oversampled"],
                        random_perm=d["perm"],
                    )
                )
        return torch.cat(out)

    def _set_losses(
        self,
        layers: list[Tensor],
        targets: PaddedTargets,
        num_masks: float | Tensor,
        point_coords: list[dict[str, Tensor]] | None,
        generator: torch.Generator | None,
        sync_with: Tensor | None,
    ) -> tuple[Tensor, Tensor, list[dict[str, object]], Tensor | None]:
        """BCE and dice of every layer (``[L]`` each, unweighted), per-layer details and ``sync_with`` on
        the host."""
        preds = torch.stack(layers).float()  # [L, B, Q, h, w]
        num_layers, batch, queries, h, w = preds.shape
        device = preds.device
        tgt_masks = self._pad_targets(targets.masks.to(device), (h, w))  # [B, M, Hp, Wp]
        num_matched = sum(min(queries, c) for c in targets.counts)
        matcher_coords, draws = self._draw_points(
            num_layers, batch, num_matched, device, point_coords, generator
        )
        indices, flat, synced = self.matcher.match_layers(
            preds, tgt_masks, targets.counts, matcher_coords, sync_with
        )
        src_index, tgt_index = host_to_device(flat, device)
        src = preds.flatten(0, 2).index_select(0, src_index)[:, None]  # [L*n, 1, h, w]
        with torch.no_grad():
            point_coords_all = self._loss_points(src, draws, num_matched)
            tgt = tgt_masks.flatten(0, 1).index_select(0, tgt_index)  # [L*n, Hp, Wp]
            point_labels = point_sample(tgt.float()[:, None], point_coords_all)[:, 0]
        point_logits = point_sample(src, point_coords_all)[:, 0]
        loss_mask = point_bce_loss(point_logits, point_labels, num_masks, num_layers)
        loss_dice = point_dice_loss(point_logits, point_labels, num_masks, num_layers)
        per_layer_points = point_coords_all.split(num_matched) if num_layers else []
        details = [
            {"indices": layer_indices, "loss_point_coords": pts}
            for layer_indices, pts in zip(indices, per_layer_points)
        ]
        return loss_mask, loss_dice, details, synced

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
        targets: PaddedTargets | Sequence[dict[str, Tensor]],
        fewshot_label: Tensor | None = None,
        point_coords: list[dict[str, Tensor]] | None = None,
        generator: torch.Generator | None = None,
        sync_with: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, object]]:
        """Losses and diagnostics.

        Args:
            pos_out: POS outputs (``pred_masks [B, Q, h, w]`` and ``aux_outputs``).
            targets: :class:`PaddedTargets`, or B dicts ``{"masks": [M_b, H, W]}``.
            fewshot_label: ``[B, H, W]`` {0, 1, 255} binary label of the sampled class, or None.
            point_coords: injected points (module docstring).
            generator: random source of the points that are not injected.
            sync_with: an optional small device tensor copied to the host together with the cost
                matrices (the step's one device-to-host copy; e.g. the outputs' finiteness flags).

        Returns:
            ``(weighted losses, details)``; details hold ``unweighted`` losses, ``num_masks``, per-layer
            ``layers`` (indices and the loss points used), ``synced`` (``sync_with`` on the host, or None)
            and, with a label, ``fewshot_index`` and
            ``fewshot_ious``.
        """
        with torch.autocast(device_type=pos_out["pred_masks"].device.type, enabled=False):
            layers = [pos_out["pred_masks"]] + [a["pred_masks"] for a in pos_out.get("aux_outputs", [])]
            suffixes = [""] + [f"_{i}" for i in range(len(layers) - 1)]
            padded = _as_padded(targets)
            num_masks = _global_num_masks(sum(padded.counts), layers[0].device)
            loss_mask, loss_dice, layer_details, synced = self._set_losses(
                layers, padded, num_masks, point_coords, generator, sync_with
            )
            weighted_mask, weighted_dice = self.mask_weight * loss_mask, self.dice_weight * loss_dice
            losses: dict[str, Tensor] = {}
            unweighted: dict[str, Tensor] = {}
            for suffix, lm, ld, wm, wd in zip(
                suffixes,
                loss_mask.unbind(),
                loss_dice.unbind(),
                weighted_mask.unbind(),
                weighted_dice.unbind(),
            ):
                unweighted[f"loss_mask{suffix}"] = lm
                unweighted[f"loss_dice{suffix}"] = ld
                losses[f"loss_mask{suffix}"] = wm
                losses[f"loss_dice{suffix}"] = wd
            details: dict[str, object] = {
                "unweighted": unweighted,
                "num_masks": num_masks,
                "layers": layer_details,
                "synced": synced,
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
            # A diverged similarity (NaN) would stop the BCE kernel (an error on the CPU, a device assert on
            # CUDA) before the caller's non-finite check could name it; finite values pass unchanged.
            em = torch.nan_to_num(em, nan=0.0, posinf=1.0, neginf=0.0)
            # [0, 1] made on the device: a tensor from a Python list would be a blocking host-to-device copy.
            target = torch.arange(2, device=em.device, dtype=em.dtype).expand_as(em)
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
