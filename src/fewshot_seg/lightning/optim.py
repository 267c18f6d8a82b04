"""Optimiser and schedule shared by both training stages (SPEC §4).

AdamW (lr 1e-4, weight decay 0.05) with weight decay switched off for normalisation layers and
embeddings, and a poly learning-rate schedule (power 0.9) stepped every optimisation step.
Gradient clipping (global norm 0.01) is a Trainer setting (``gradient_clip_val`` in
``lightning_configs/trainer.yaml``), not part of the optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    optimizer = torch.optim.AdamW(
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
