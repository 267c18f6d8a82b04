"""Stopping a diverged run in one line: non-finite model outputs, loss terms or weights.

A learning rate far too high (``--model.init_args.optim.lr=1e30``) makes the weights infinite after one
optimiser step; the next loss then fails deep inside scipy's Hungarian matcher (stage 1: "matrix contains
invalid numeric entries") or torch's BCE (stage 2: "all elements of input should be between 0 and 1"),
and a validation on such weights would write a checkpoint of them. The LightningModules check their
outputs and the loss terms of every training step; ``BestCheckpoint`` checks the weights before it
writes. Each raises :class:`NonFiniteError`, which the console script prints as one line (exit 2).

A training step asks the device for these checks at most twice (:class:`StepCheck`): the outputs' flags
(one ``isfinite`` reduction per tensor, stacked) travel to the host with stage 1's cost matrices, or with
the loss flags in stage 2; the loss flags are read once after the losses. The names are only worked out
when a flag is bad. With a gradient scaler (``16-mixed``), a non-finite step is what the scaler exists for:
it skips the optimiser step and lowers its scale. The check then runs after the scaler's decision (in
``on_train_batch_end``) and stops the run only when the scale has already fallen below
:data:`MIN_LOSS_SCALE`, i.e. when lowering it no longer helps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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


MIN_LOSS_SCALE = 1.0
"""With a gradient scaler, a non-finite step stops the run once the scale is below this: from 2**16, the
scaler has then skipped 16 steps in a row without curing it (an fp16 overflow needs far fewer)."""


def finite_flags(tree: Any) -> tuple[list[str], Tensor | None]:
    """Names of the floating-point tensors of ``tree`` and a ``[n]`` bool device tensor, True where the
    tensor is all finite; no host sync (None when there is no tensor)."""
    # Empty tensors are finite and have no max: left out.
    items = [(name, t) for name, t in _tensors(tree) if t.numel()]
    if not items:
        return [], None
    with torch.no_grad():
        # max |x| of every tensor in one multi-tensor kernel; NaN and inf propagate to it. Stacking mixes
        # dtypes (bf16 outputs, fp32 losses) by type promotion.
        peaks = torch._foreach_norm([t for _, t in items], float("inf"))
        return [name for name, _ in items], torch.isfinite(torch.stack(peaks))


def bad_names(names: list[str], flags: Tensor | None) -> list[str]:
    """The names whose flag (host values of :func:`finite_flags`) is not set."""
    if flags is None:
        return []
    return [name for name, good in zip(names, flags.tolist()) if not good]


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
        raise _outputs_error(module, bad, where)


def check_weights(module: nn.Module, step: int, what: str) -> None:
    """Raise NonFiniteError when a floating-point parameter or buffer of ``module`` is not finite."""
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, Tensor)}
    bad = non_finite(state)
    if bad:
        raise NonFiniteError(
            f"step {step}: the weights hold non-finite values ({_names(bad)}); {what} not written, the "
            f"last good checkpoint is kept: training diverged; {advice(module)}"
        )


def grad_scaler(module: Any) -> Any:
    """The gradient scaler of ``module``'s Trainer (``16-mixed``), or None."""
    trainer = getattr(module, "_trainer", None)
    return (
        getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
    )


def _outputs_error(module: Any, bad: list[str], where: str) -> NonFiniteError:
    return NonFiniteError(
        f"step {module.global_step}: non-finite model outputs ({_names(bad)}) {where}: training "
        f"diverged; {advice(module)}"
    )


def _losses_error(module: Any, losses: Mapping[str, Tensor], bad: list[str]) -> NonFiniteError:
    values = ", ".join(f"{k}={float(losses[k].detach()):g}" for k in bad[:4])
    more = f", ... ({len(bad)} in all)" if len(bad) > 4 else ""
    return NonFiniteError(
        f"step {module.global_step}: non-finite loss terms ({values}{more}): training diverged; "
        f"{advice(module)}"
    )


@dataclass
class StepCheck:
    """The non-finite checks of one training step, with at most two host syncs.

    ``outputs`` / ``losses``: the names and device flags of :func:`finite_flags`. Without a gradient
    scaler, :meth:`outputs_read` and :meth:`losses_ready` raise at once (before the optimiser step, so the
    weights stay finite); with one, :meth:`after_optimizer_step` decides after the scaler has.
    """

    module: Any
    output_names: list[str] = field(default_factory=list)
    bad_outputs: list[str] = field(default_factory=list)
    losses: Mapping[str, Tensor] | None = None
    loss_names: list[str] = field(default_factory=list)
    loss_flags: Tensor | None = None

    @property
    def scaler(self) -> Any:
        return grad_scaler(self.module)

    def outputs_read(
        self, names: list[str], host_flags: Tensor | None, where: str = "before the loss"
    ) -> None:
        """Outputs' flags, already on the host (they travelled with another copy)."""
        self.output_names = names
        self.bad_outputs = bad_names(names, host_flags)
        if self.bad_outputs and self.scaler is None:
            raise _outputs_error(self.module, self.bad_outputs, where)

    def losses_ready(self, losses: Mapping[str, Tensor], extra: Any = None) -> None:
        """Loss terms computed: one host read of their flags (and of ``extra``'s: outputs not yet read),
        deferred to :meth:`after_optimizer_step` under a scaler."""
        self.loss_names, self.loss_flags = finite_flags({"losses": dict(losses), "outputs": extra})
        self.losses = losses
        if self.scaler is None:
            self._raise_if_bad()

    def _raise_if_bad(self) -> None:
        bad = bad_names(self.loss_names, self.loss_flags.cpu() if self.loss_flags is not None else None)
        bad_outputs = self.bad_outputs + [n.split(".", 1)[1] for n in bad if n.startswith("outputs")]
        if bad_outputs:
            raise _outputs_error(self.module, bad_outputs, "before the loss")
        bad_losses = [n.split(".", 1)[1] for n in bad if n.startswith("losses")]
        if bad_losses:
            assert self.losses is not None
            raise _losses_error(self.module, self.losses, bad_losses)

    def after_optimizer_step(self) -> None:
        """Under a gradient scaler: a non-finite step was skipped by the scaler; stop only once its scale
        is below :data:`MIN_LOSS_SCALE`."""
        scaler = self.scaler
        if scaler is None or self.loss_flags is None:
            return
        bad = bad_names(self.loss_names, self.loss_flags.cpu())
        if (bad or self.bad_outputs) and scaler.get_scale() < MIN_LOSS_SCALE:
            self._raise_if_bad()
