"""Stopping a diverged run in one line: non-finite model outputs, loss terms or weights.

A learning rate far too high (``--model.init_args.optim.lr=1e30``) makes the weights infinite after one
optimiser step; the next loss then fails deep inside scipy's Hungarian matcher (stage 1: "matrix contains
invalid numeric entries") or torch's BCE (stage 2: "all elements of input should be between 0 and 1"),
and a validation on such weights would write a checkpoint of them. The LightningModules check their
outputs before the loss and the loss terms after it; ``BestCheckpoint`` checks the weights before it
writes. Each raises :class:`NonFiniteError`, which the console script prints as one line (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class NonFiniteError(RuntimeError):
    """Training diverged: a model output, loss term or weight is NaN or infinite (step and names given)."""


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        if tree.is_floating_point():
            yield prefix or "output", tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}[{i}]")


def non_finite(tree: Any) -> list[str]:
    """Names (``pred_masks``, ``aux_outputs[0].pred_masks``, ...) of the tensors holding NaN or inf.

    One device sync whatever the number of tensors; the names are only worked out when one is bad.
    """
    items = list(_tensors(tree))
    if not items:
        return []
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in items])
    if bool(ok.all()):
        return []
    return [name for (name, _), good in zip(items, ok.tolist()) if not good]


def advice(module: Any) -> str:
    lr = getattr(getattr(module, "optim", None), "lr", None)
    now = f", now {lr:g}" if isinstance(lr, (int, float)) else ""
    return (
        f"lower the learning rate (--model.init_args.optim.lr{now}), clip gradients "
        "(--trainer.gradient_clip_val) or train in full precision (--trainer.precision=32-true)"
    )


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def check_outputs(module: Any, out: Any, where: str = "before the loss") -> None:
    """Raise NonFiniteError naming the step and the outputs when any output is not finite."""
    bad = non_finite(out)
    if bad:
        raise NonFiniteError(
            f"step {module.global_step}: non-finite model outputs ({_names(bad)}) {where}: training "
            f"diverged; {advice(module)}"
        )


def check_losses(module: Any, losses: Mapping[str, Tensor]) -> None:
    """Raise NonFiniteError naming the step and the loss terms that are not finite."""
    bad = non_finite(dict(losses))
    if bad:
        values = ", ".join(f"{k}={float(losses[k].detach()):g}" for k in bad[:4])
        more = f", ... ({len(bad)} in all)" if len(bad) > 4 else ""
        raise NonFiniteError(
            f"step {module.global_step}: non-finite loss terms ({values}{more}): training diverged; "
            f"{advice(module)}"
        )


def check_weights(module: nn.Module, step: int, what: str) -> None:
    """Raise NonFiniteError when a floating-point parameter or buffer of ``module`` is not finite."""
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, Tensor)}
    bad = non_finite(state)
    if bad:
        raise NonFiniteError(
            f"step {step}: the weights hold non-finite values ({_names(bad)}); {what} not written, the "
            f"last good checkpoint is kept: training diverged; {advice(module)}"
        )
