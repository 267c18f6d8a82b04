"""CUDA-graph replay of a forward pass with static shapes (the Segmenter's query path).

A forward pass of the paper-size model issues about three thousand kernels; at batch 1 the GPU finishes
each faster than Python and the dispatcher issue the next, so the host sets the pace. A CUDA graph records
the kernels of one call once and replays them with one launch. That needs fixed shapes and addresses:
the inputs are copied into a static buffer, the outputs are read from static buffers (cloned before they
are returned), and one graph is kept per (input shape, dtype, support encoding). Anything that cannot be
captured (a host sync, a CPU tensor) makes the capture fail: the wrapper then warns once and runs eagerly,
as it does on every device other than CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MAX_GRAPHS = 4
"""graphs kept at once (each holds its own memory pool); the oldest goes first."""


class GraphedForward:
    """``fn(images, context)`` replayed from CUDA graphs where possible, else called directly.

    Args:
        fn: a function of a ``[B, ...]`` CUDA tensor and a context object (e.g. encoded supports, held by
            the graph) returning a dict of tensors, with no host sync inside.
        enabled: use graphs (on CUDA inputs); False = always eager.
    """

    def __init__(self, fn: Callable[[Tensor, Any], dict[str, Tensor]], enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled
        self._graphs: dict[tuple, tuple[Any, Tensor, dict[str, Tensor], Any]] = {}
        self._failed = False

    def __call__(self, images: Tensor, context: Any) -> dict[str, Tensor]:
        if not (self.enabled and images.is_cuda) or self._failed:
            return self.fn(images, context)
        key = (tuple(images.shape), images.dtype, id(context))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(images, context)
            if entry is None:
                return self.fn(images, context)
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = entry
        graph, static_in, static_out, _ = entry
        static_in.copy_(images)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _capture(self, images: Tensor, context: Any) -> tuple | None:
        static_in = images.clone()
        try:
            # Warm-up on a side stream (lazy initialisation, cuDNN/cuBLAS choices, the models' caches)
            # before the capture, as torch.cuda.graphs requires.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(static_in, context)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_in, context)
        except RuntimeError as err:  # something in fn cannot be captured: run eagerly from now on
            warnings.warn(f"CUDA graph capture failed, running eagerly: {err}", stacklevel=3)
            self._failed = True
            return None
        # The context is held so that its id (the key) is not reused by another object meanwhile.
        return graph, static_in, static_out, context
