"""Values that depend on sizes alone (shapes, dtype, device), made once and reused.

Position encodings, reference points and the deformable attention's index constants are the same at
every step of a run at a fixed size; made per call they are dozens of tensor operations per layer (and on a
GPU blocking host-to-device copies). One small bounded cache holds them: inputs of many sizes (tests,
evaluation at several sizes) empty it rather than let it grow. The key includes whether inference mode is
on, since a tensor made under ``torch.inference_mode`` cannot enter an autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class SizeCache(Generic[T]):
    """At most ``max_entries`` values by key; full, it is emptied before the next value is added.

    Example:
        >>> cache: SizeCache[int] = SizeCache(2)
        >>> cache.get(("a",), lambda: 1), cache.get(("a",), lambda: 2)
        (1, 1)
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._values: dict[tuple, T] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value of ``key``, made by ``make()`` the first time (read only: it is shared)."""
        full_key = (key, torch.is_inference_mode_enabled())
        value = self._values.get(full_key)
        if value is None:
            if len(self._values) >= self.max_entries:
                self._values.clear()
            value = self._values[full_key] = make()
        return value
