"""Linear layers on row views: ``F.linear``'s arithmetic with fewer tensor operations."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` of ``[..., C]`` -> ``[rows, out]`` (rows = the leading dims flattened, in order).

    On a contiguous input ``F.linear`` itself flattens, runs ``addmm`` and views the result back: the same
    ``addmm`` here, without the two views (and their two backward views) when the caller reshapes anyway.
    Any other input goes through ``F.linear`` as it is (its matmul-and-add path), so the arithmetic, and
    the bits, are ``F.linear``'s in both cases.
    """
    if x.dim() > 2 and x.is_contiguous():
        return F.linear(x.view(-1, x.shape[-1]), weight, bias)
    out = F.linear(x, weight, bias)
    return out.reshape(-1, out.shape[-1])
