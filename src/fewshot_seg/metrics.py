"""Few-shot segmentation metric: class mIoU and FB-IoU accumulated over episodes (SPEC §6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from fewshot_seg.episode import IGNORE_INDEX

Variant = Literal["hsnet", "pfenet"]
Unscored = Literal["skip", "zero"]


def episode_intersection_union(
    pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Background/foreground intersection and union of one episode, ignore pixels dropped.

    Args:
        pred: ``[H, W]`` binary prediction (bool or {0, 1}).
        target: ``[H, W]`` label in {0, 1, ``ignore_index``}, same size as ``pred``.

    Returns:
        ``(intersection, union)``, each int64 ``[2]`` (index 0 = background, 1 = foreground).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    valid = target != ignore_index
    p = pred[valid].long().clamp_(0, 1)
    t = target[valid].long()
    if t.numel() and int(t.max()) > 1:
        raise ValueError("target must hold only 0, 1 and the ignore index")
    p_fg, t_fg = p == 1, t == 1
    fg_i = (p_fg & t_fg).sum()
    fg_u = (p_fg | t_fg).sum()
    bg_i = (~p_fg & ~t_fg).sum()
    bg_u = (~p_fg | ~t_fg).sum()
    return torch.stack([bg_i, fg_i]), torch.stack([bg_u, fg_u])


def fewshot_iou(
    intersection: Tensor, union: Tensor, variant: Variant = "hsnet", scored: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Class mIoU, FB-IoU and per-class IoU from per-class summed areas (SPEC §6).

    Args:
        intersection: ``[2, C]`` background/foreground intersections summed over each class's episodes.
        union: ``[2, C]`` the unions, likewise.
        variant: ``"hsnet"`` divides by ``max(U, 1)``, ``"pfenet"`` by ``U + 1e-10``.
        scored: ``[C]`` bool, the classes that had at least one episode; None = all of them.

    Returns:
        ``(miou, fbiou, class_iou [C])`` in percent, float64. The mIoU is the mean over the ``scored``
        classes (0 where none was); ``class_iou`` of a class without episodes is 0 and means nothing.
    """
    num, den = intersection.double(), union.double()
    ratio = (lambda a, b: a / b.clamp(min=1.0)) if variant == "hsnet" else (lambda a, b: a / (b + 1e-10))
    class_iou = 100.0 * ratio(num[1], den[1])
    fbiou = 100.0 * ratio(num.sum(dim=1), den.sum(dim=1)).mean()
    # A class drawn in no episode has no IoU: counting it as 0 would lower the mean by chance (few
    # episodes), and with it the choice of the best checkpoint.
    kept = class_iou if scored is None else class_iou[scored]
    miou = kept.mean() if kept.numel() else class_iou.new_zeros(())
    return miou, fbiou, class_iou


class FewShotIoU(Metric):
    """Class mIoU and FB-IoU of binary few-shot predictions, the field's standard (SPEC §6).

    Intersections and unions of background and foreground are *summed* per episode class over all
    episodes (not a mean of per-episode IoUs, which reads ~3 points higher). Then
    ``IoU_c = I_c[fg] / max(U_c[fg], 1)``, ``miou = 100 * mean_c IoU_c`` over the classes of
    ``class_ids`` that received at least one episode (``compute()["unscored"]`` lists the others, which
    have no IoU; ``unscored="zero"`` counts them as 0, as the reference evaluators) and
    ``fbiou = 100 * mean_{bg,fg} (sum_c I_c / sum_c U_c)``.

    Example:
        >>> import torch
        >>> metric = FewShotIoU(class_ids=[1, 2])
        >>> pred = torch.tensor([[[1, 1], [0, 0]], [[0, 1], [0, 0]]])
        >>> target = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [255, 0]]])
        >>> metric.update(pred, target, class_id=[1, 2])
        >>> out = metric.compute()
        >>> round(float(out["miou"]), 2), round(float(out["fbiou"]), 2), int(out["class_episodes"][2])
        (75.0, 73.33, 1)

    Args:
        class_ids: the fold's (novel) class ids; every scored episode must belong to one of them.
        variant: ``"hsnet"`` (default, SPEC) divides by ``max(U, 1)``; ``"pfenet"`` by ``U + 1e-10``
            (PFENet / CyCTR / MM-Former evaluators). Both give the same numbers unless a union is 0.
        ignore_index: label value dropped from prediction and target before counting.
        unscored: a class without episodes is left out of the mIoU (``"skip"``, default) or enters it as
            IoU 0 (``"zero"``, as the HSNet / PFENet evaluators and SPEC §6 do: the same number whenever
            every class is drawn, as in 1,000-episode tests, and a lower one by chance otherwise).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    intersection: Tensor
    union: Tensor
    episodes: Tensor

    def __init__(
        self,
        class_ids: Sequence[int],
        variant: Variant = "hsnet",
        ignore_index: int = IGNORE_INDEX,
        unscored: Unscored = "skip",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        ids = [int(c) for c in class_ids]
        if not ids:
            raise ValueError("FewShotIoU needs at least one class id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate class ids: {ids}")
        if variant not in ("hsnet", "pfenet"):
            raise ValueError(f"unknown variant {variant!r}; expected 'hsnet' or 'pfenet'")
        if unscored not in ("skip", "zero"):
            raise ValueError(f"unknown unscored {unscored!r}; expected 'skip' or 'zero'")
        self.unscored = unscored
        self.class_ids = ids
        self.variant = variant
        self.ignore_index = ignore_index
        # Lookup global id -> row; a buffer so that it follows the metric's device.
        lut = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        lut[torch.as_tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("_class_index", lut, persistent=False)
        # Integer counts: exact, and summed across processes in DDP.
        n = len(ids)
        self.add_state("intersection", torch.zeros(2, n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(2, n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("episodes", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def _rows(self, class_id: Tensor | Sequence[int]) -> Tensor:
        cls = torch.as_tensor(class_id, dtype=torch.long, device=self._class_index.device).reshape(-1)
        known = (cls >= 0) & (cls < self._class_index.numel())
        rows = torch.full_like(cls, -1)
        rows[known] = self._class_index[cls[known]]
        if bool((rows < 0).any()):
            bad = sorted({int(c) for c in cls[rows < 0].tolist()})
            raise ValueError(f"episode class ids {bad} are not among the metric's classes {self.class_ids}")
        return rows

    def update(
        self,
        pred: Tensor | Sequence[Tensor],
        target: Tensor | Sequence[Tensor],
        class_id: Tensor | Sequence[int],
    ) -> None:
        """Add B episodes.

        Args:
            pred: ``[B, H, W]`` in {0, 1}, or B tensors ``[h_i, w_i]`` (each query scored at its
                original size).
            target: same layout as ``pred``, values in {0, 1, ``ignore_index``}.
            class_id: ``[B]`` episode class ids (members of ``class_ids``).
        """
        preds = list(pred.unbind(0)) if isinstance(pred, Tensor) else list(pred)
        targets = list(target.unbind(0)) if isinstance(target, Tensor) else list(target)
        rows = self._rows(class_id)
        if not (len(preds) == len(targets) == rows.numel()):
            raise ValueError(
                f"got {len(preds)} predictions, {len(targets)} targets and {rows.numel()} class ids"
            )
        if not preds:
            return
        inter, union = zip(
            *(episode_intersection_union(p, t, self.ignore_index) for p, t in zip(preds, targets))
        )
        inter_t = torch.stack(inter, dim=1).to(self.intersection.device)  # [2, B]
        union_t = torch.stack(union, dim=1).to(self.union.device)
        rows = rows.to(self.intersection.device)
        self.intersection.index_add_(1, rows, inter_t)
        self.union.index_add_(1, rows, union_t)
        self.episodes.index_add_(0, rows, torch.ones_like(rows))

    def compute(self) -> dict[str, Tensor | dict[int, Tensor]]:
        """Everything a results summary needs, over all processes (torchmetrics syncs the states).

        Returns:
            ``miou`` and ``fbiou`` (percent, float64 scalars), ``class_iou`` ``{class id: percent}``
            and ``class_episodes`` ``{class id: episodes}`` (int64 scalars) of every class, and
            ``unscored``: the class ids without an episode (in ``class_ids`` order), left out of
            ``miou`` unless the metric was built with ``unscored="zero"``.
        """
        scored = self.episodes > 0
        kept = scored if self.unscored == "skip" else None
        miou, fbiou, class_iou = fewshot_iou(self.intersection, self.union, self.variant, kept)
        return {
            "miou": miou,
            "fbiou": fbiou,
            "class_iou": {c: class_iou[i] for i, c in enumerate(self.class_ids)},
            "class_episodes": {c: self.episodes[i] for i, c in enumerate(self.class_ids)},
            "unscored": [c for i, c in enumerate(self.class_ids) if not bool(scored[i])],
        }


def unscored_note(result: Mapping[str, Any], split: str) -> str | None:
    """A line naming the classes a :meth:`FewShotIoU.compute` result left out of its mIoU, else None."""
    unscored = list(result.get("unscored", ()))
    if not unscored:
        return None
    episodes = sum(int(n) for n in result["class_episodes"].values())
    kept = len(result["class_episodes"]) - len(unscored)
    return (
        f"{split}: class{'es' if len(unscored) > 1 else ''} {', '.join(map(str, unscored))} drew no episode "
        f"among the {episodes}; the mIoU is the mean over the other {kept} classes"
    )
