"""Freezing a sub-module: the one definition the backbone, the LightningModules and the callback share."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """No gradients and inference behaviour; returns ``module``.

    Eval mode matters as much as ``requires_grad=False``: a BatchNorm layer in train mode keeps
    updating its running statistics from batch statistics even without gradients.
    """
    module.requires_grad_(False)
    module.eval()
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when no parameter needs a gradient and no sub-module is in train mode."""
    return not any(p.requires_grad for p in module.parameters()) and not any(
        m.training for m in module.modules()
    )
