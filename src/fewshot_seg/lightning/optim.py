"""Optimiser and schedule shared by both training stages (SPEC §4).

AdamW (lr 1e-4, weight decay 0.05) with weight decay switched off for normalisation layers and
embeddings, and a poly learning-rate schedule (power 0.9) stepped every optimisation step.
Gradient clipping (global norm 0.01) is a Trainer setting (``gradient_clip_val`` in
``lightning_configs/trainer.yaml``), not part of the optimiser.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fewshot_seg.config import OptimizerConfig

# Parameter names (any dotted component) that are embeddings stored as bare Parameters or
# nn.Embedding weights: the pixel decoder's level embedding, the decoder's query features /
# query positions and its level embedding. Weight decay would pull these towards 0 for no benefit.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = ("level_embed", "query_embed", "query_feat", "pos_embed")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_module(module: nn.Module) -> bool:
    """True for every normalisation layer, including custom ones such as ``FrozenBatchNorm2d``."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    no_decay_names: Iterable[str] = DEFAULT_NO_DECAY_NAMES,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict]:
    """Split the *trainable* parameters of ``model`` into optimiser groups.

    Parameters of norm layers and of ``nn.Embedding`` modules, and parameters with a dotted name
    component in ``no_decay_names``, get ``weight_decay=0``; all others (biases included, as in
    Mask2Former) get ``weight_decay``. ``lr_mult`` maps a name prefix (e.g. ``"backbone"``) to a
    learning-rate multiplier. Frozen parameters (``requires_grad=False``) are left out, so freezing
    must happen before the optimiser is built. Shared parameters are counted once.

    Returns:
        Non-empty groups with keys ``params``, ``lr``, ``weight_decay``, ``name``.
    """
    no_decay = set(no_decay_names)
    mults = dict(lr_mult or {})
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        module_no_decay = is_norm_module(module) or isinstance(module, nn.Embedding)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            decay = 0.0 if module_no_decay or no_decay.intersection(full.split(".")) else weight_decay
            mult = 1.0
            for prefix, m in mults.items():
                if full == prefix or full.startswith(prefix + "."):
                    mult = m
            key = (mult, decay)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": lr * mult,
                    "weight_decay": decay,
                    "name": f"lr{mult:g}_wd{decay:g}",
                }
            groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter; nothing to optimise")
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    cfg: OptimizerConfig,
    max_steps: int,
    lr_mult: Mapping[str, float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict:
    """AdamW + a poly schedule stepped every step, in the form ``configure_optimizers`` returns.

    The schedule is ``torch.optim.lr_scheduler.PolynomialLR``: ``lr * (1 - step / max_steps) ** power``
    (detectron2's WarmupPolyLR without warm-up), 0 from ``max_steps`` on.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    groups = param_groups(model, cfg.lr, cfg.weight_decay, lr_mult=lr_mult)
    optimizer = AdamW(
        groups,
        lr=cfg.lr,
        betas=betas,
        weight_decay=cfg.weight_decay,
        **adamw_implementation([p for g in groups for p in g["params"]]),
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_steps, power=cfg.poly_power)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
    }


class _HostValues:
    """Host copies of scalar tensors' values, by tensor identity (a dict keyed by tensors would compare
    them with ``==``, an operation and a read each); an entry dies with its tensor."""

    def __init__(self) -> None:
        self._values: dict[int, tuple[weakref.ref[torch.Tensor], float]] = {}

    def get(self, tensor: torch.Tensor) -> float | None:
        entry = self._values.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def set(self, tensor: torch.Tensor, value: float) -> None:
        key = id(tensor)
        self._values[key] = (weakref.ref(tensor, lambda _: self._values.pop(key, None)), value)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose foreach update on host-side step counters reads no counter.

    torch's foreach AdamW (the CPU path, :func:`adamw_implementation`) reads every parameter's step
    counter with ``item()`` twice per step for the bias corrections: 580 operations of a paper-size
    stage-1 step of about 6,000. This class keeps the counters' values on the host as well (read once per
    counter, when first seen: a new state or a loaded checkpoint) and runs torch's own sequence of
    foreach operations once per (device, dtype, step value), normally once per group: the same bits as
    ``torch.optim.AdamW(foreach=True)`` (tests/test_optim.py), the same state and checkpoints. Every other
    configuration (fused, capturable, amsgrad, maximize, complex, differentiable, per-parameter loop) is
    torch's own ``step``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter_values = _HostValues()

    def _own_update(self, group: dict) -> bool:
        plain = group["foreach"] and not any(
            group[k] for k in ("fused", "capturable", "amsgrad", "maximize", "differentiable")
        )
        return (
            bool(plain)
            and not any(isinstance(group[k], torch.Tensor) for k in ("lr", "betas", "weight_decay", "eps"))
            and not any(p.is_complex() for p in group["params"])
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if not all(self._own_update(g) for g in self.param_groups):
            self._counter_values = _HostValues()  # torch's step moves the counters
            return super().step(closure)
        self._cuda_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            if params:
                self._update(group, params, grads, exp_avgs, exp_avg_sqs, steps)
        return loss

    def _update(
        self,
        group: dict,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        """torch's ``_multi_tensor_adam`` (decoupled weight decay, host counters), the bias corrections
        computed once per batch of equal counters."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        weight_decay = group["weight_decay"]
        values = self._counter_values
        batches: dict[tuple, list[int]] = {}
        for i, (p, counter) in enumerate(zip(params, steps, strict=True)):
            if values.get(counter) is None:
                values.set(counter, counter.item())  # once: a new or loaded counter
            if counter.device.type != "cpu":
                raise ValueError("host step counters expected with foreach AdamW")
            batches.setdefault((p.device, p.dtype, values.get(counter)), []).append(i)
        for (_, _, before), members in batches.items():
            b_params = [params[i] for i in members]
            b_grads = [grads[i] for i in members]
            b_exp_avgs = [exp_avgs[i] for i in members]
            b_exp_avg_sqs = [exp_avg_sqs[i] for i in members]
            b_steps = [steps[i] for i in members]
            torch._foreach_add_(b_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
            step = before + 1.0
            for counter in b_steps:
                values.set(counter, step)
            if weight_decay != 0:
                torch._foreach_mul_(b_params, 1 - lr * weight_decay)
            torch._foreach_lerp_(b_exp_avgs, b_grads, 1 - beta1)
            torch._foreach_mul_(b_exp_avg_sqs, beta2)
            torch._foreach_addcmul_(b_exp_avg_sqs, b_grads, b_grads, 1 - beta2)
            # torch computes these per parameter, in double precision, from the counter's value.
            step_size = (lr / (1 - beta1**step)) * -1
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = torch._foreach_sqrt(b_exp_avg_sqs)
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(b_params, b_exp_avgs, denom, step_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._counter_values = _HostValues()


def adamw_implementation(params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """AdamW's multi-tensor form for ``params``: ``fused`` when all are on CUDA (one kernel per step),
    else ``foreach`` (a dozen operations for all parameters instead of ~10 per parameter).

    On the CPU the foreach update gives the same bits as the per-parameter loop (tests/test_optim.py);
    the fused CPU kernel does not, so it is not used there.
    """
    devices = {p.device.type for p in params}
    if devices == {"cuda"}:
        return {"fused": True}
    return {"foreach": True}


def resolve_max_steps(max_steps: int | None, trainer: object | None) -> int:
    """The schedule length: the module's ``max_steps`` if given, else the Trainer's estimate.

    ``trainer.estimated_stepping_batches`` covers ``max_steps``/``max_epochs``/``fast_dev_run``;
    it is infinite when neither limit is set, which a poly schedule cannot use.
    """
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    est = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
    if est is None or est == float("inf") or est <= 0:
        raise ValueError(
            "cannot size the poly schedule: set the model's max_steps or the Trainer's max_steps/max_epochs"
        )
    return int(est)
