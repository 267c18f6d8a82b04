"""Hungarian matching of POS mask proposals to ground-truth masks (stage 1, no class term)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fewshot_seg.episode import host_to_device
from fewshot_seg.models.point_sampling import point_sample

MatMul = Callable[[Tensor, Tensor], Tensor]


class MatchedPairs(Sequence[tuple[Tensor, Tensor]]):
    """One layer's assignments ``(pred_idx, tgt_idx)`` per image as int64 CPU tensors, made when read.

    The step itself uses the flat pairs; these are diagnostics (tests, debugging), and a tensor made from
    an array is one operation dispatched each, 160 per paper-size step if made eagerly.
    """

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    @overload
    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[Tensor, Tensor]]: ...

    def __getitem__(self, i: int | slice) -> tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        rows, cols = self._pairs[i]
        return torch.from_numpy(rows), torch.from_numpy(cols)


def per_matrix_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of ``[G, Q, P]`` and ``[G, P, n]`` as G separate products.

    A CPU BLAS runs a one-column product as a matrix-vector product, whose sums a batched product does not
    reproduce bit for bit; products with more columns batch without changing a bit.
    """
    return torch.stack([x @ y for x, y in zip(a.unbind(0), b.unbind(0), strict=True)])


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor, matmul: MatMul = torch.matmul) -> Tensor:
    """Mean sigmoid-BCE over points between every prediction and every target.

    Args:
        inputs: ``[..., Q, P]`` logits.
        targets: ``[..., n, P]`` values in ``[0, 1]`` (the same leading dims: one problem each).
        matmul: the matrix product (``per_matrix_matmul`` for one-target problems).

    Returns:
        ``[..., Q, n]`` costs.
    """
    num_points = inputs.shape[-1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    # BCE is linear in the target, so all pairs come from two matrix products.
    t = targets.transpose(-1, -2)
    return (matmul(pos, t) + matmul(neg, 1 - t)) / num_points


def batch_dice_cost(inputs: Tensor, targets: Tensor, matmul: MatMul = torch.matmul) -> Tensor:
    """Dice cost ``1 - (2 sum(sig*t) + 1) / (sum sig + sum t + 1)`` for every pair.

    Args:
        inputs: ``[..., Q, P]`` logits.
        targets: ``[..., n, P]`` values in ``[0, 1]``.
        matmul: the matrix product (``per_matrix_matmul`` for one-target problems).

    Returns:
        ``[..., Q, n]`` costs.
    """
    probs = inputs.sigmoid()
    numerator = matmul(2 * probs, targets.transpose(-1, -2))
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
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

    @torch.no_grad()
    def layer_costs(
        self, preds: Tensor, targets: Tensor, counts: Sequence[int], point_coords: Tensor
    ) -> Tensor:
        """Weighted cost matrices of every layer and image, bit for bit those of :meth:`costs`.

        The point samples are taken in two batched calls. The products are not one batched product over
        the padded targets: a CPU BLAS sums a ``[Q, P] @ [P, n]`` product in an order that depends on
        ``n`` and on whether it is batched, so a padded or batched product changes the costs in the last
        bit, and a near-tie then flips an assignment (a different training run). Images are grouped by
        their target count ``n`` instead: one batched product per group (it gives :meth:`costs`' bits for
        ``n >= 2``); one-target images take one product per (layer, image) (``per_matrix_matmul``). The
        elementwise parts run batched: the same bits whenever ``Q x P`` is a multiple of 64 (the CPU's
        vector kernels compute a remainder with scalar code).

        Args:
            preds: ``[L, B, Q, h, w]`` logits.
            targets: ``[B, M, H', W']`` padded binary masks covering the same extent.
            counts: the real targets of each image (host ints, ``counts[b] <= M``).
            point_coords: ``[L, B, P, 2]`` the matcher's points of every layer and image.

        Returns:
            ``[L, B, Q, M]`` float32 costs (the columns of padding targets are 0).
        """
        num_layers, batch, queries = preds.shape[:3]
        num_points, width = point_coords.shape[2], targets.shape[1]
        with torch.autocast(device_type=preds.device.type, enabled=False):
            cost = preds.new_zeros((num_layers, batch, queries, width), dtype=torch.float32)
            if width == 0:
                return cost
            out = point_sample(preds.float().flatten(0, 1), point_coords.flatten(0, 1))  # [L*B, Q, P]
            # Every layer's points of an image in one call: [B, M, L*P] -> [L, B, M, P].
            per_image = point_coords.transpose(0, 1).reshape(batch, num_layers * num_points, 2)
            tgt = point_sample(targets.float(), per_image).view(batch, width, num_layers, num_points)
            tgt = tgt.permute(2, 0, 1, 3)
            out = out.view(num_layers, batch, queries, num_points)
            for n in sorted(set(counts) - {0}):
                group = [b for b, c in enumerate(counts) if c == n]
                images = host_to_device(torch.tensor(group, dtype=torch.int64), preds.device)
                # Contiguous [L*G, Q, P] and [L*G, n, P]: the products run as costs()' do (transposed B).
                group_out = out.index_select(1, images).flatten(0, 1)
                group_tgt = tgt[:, :, :n].index_select(1, images).flatten(0, 1).contiguous()
                matmul = per_matrix_matmul if n == 1 else torch.matmul
                group_cost = self.cost_mask * batch_sigmoid_ce_cost(
                    group_out, group_tgt, matmul
                ) + self.cost_dice * batch_dice_cost(group_out, group_tgt, matmul)
                cost[..., :n].index_copy_(1, images, group_cost.view(num_layers, -1, queries, n))
        return cost

    @torch.no_grad()
    def match_layers(
        self,
        preds: Tensor,
        targets: Tensor,
        counts: list[int],
        point_coords: Tensor,
        sync_with: Tensor | None = None,
    ) -> tuple[list[list[tuple[Tensor, Tensor]]], Tensor, Tensor | None]:
        """Match every layer and image with one device-to-host copy.

        The cost matrices (:meth:`layer_costs`) and ``sync_with`` travel to the host together; scipy solves
        each ``[Q, counts[b]]`` problem there. Non-finite costs (diverged outputs) are replaced by large
        finite ones, so the step completes and the caller decides (``fewshot_seg.lightning.finite``).

        Args:
            preds: ``[L, B, Q, h, w]`` logits.
            targets: ``[B, M, H', W']`` padded masks; image b has ``counts[b]`` real ones.
            counts: targets per image (host).
            point_coords: ``[L, B, P, 2]``.
            sync_with: an optional small tensor to bring to the host in the same copy.

        Returns:
            ``(indices, flat, synced)``: ``indices[l][b] = (pred_idx ascending, tgt_idx)`` int64 CPU
            tensors (made when read: :class:`MatchedPairs`);
            ``flat`` ``[2, L*n]`` the pairs as row indices into ``preds.flatten(0, 2)`` and
            ``targets.flatten(0, 1)`` (layer-major, then image, then prediction index); ``synced`` is
            ``sync_with`` on the host (float32, flattened) or None.
        """
        num_layers, batch, queries = preds.shape[:3]
        width = targets.shape[1]
        cost = self.layer_costs(preds, targets, counts, point_coords)
        parts = [cost.flatten()] + ([sync_with.detach().float().flatten()] if sync_with is not None else [])
        host = torch.cat(parts).cpu() if len(parts) > 1 else parts[0].cpu()
        costs = host[: cost.numel()].view(num_layers, batch, queries, width).numpy()
        synced = host[cost.numel() :] if sync_with is not None else None
        if not np.isfinite(costs).all():
            costs = np.nan_to_num(costs, nan=1e30, posinf=1e30, neginf=-1e30)
        indices: list[list[tuple[Tensor, Tensor]]] = []
        src_rows, tgt_rows = [], []
        for li in range(num_layers):
            layer = []
            for b in range(batch):
                rows, cols = linear_sum_assignment(costs[li, b, :, : counts[b]])
                layer.append((rows.astype(np.int64), cols.astype(np.int64)))
                src_rows.append((li * batch + b) * queries + rows)
                tgt_rows.append(b * width + cols)
            indices.append(MatchedPairs(layer))
        flat = torch.from_numpy(
            np.stack([np.concatenate(src_rows), np.concatenate(tgt_rows)]).astype(np.int64)
        )
        return indices, flat, synced
