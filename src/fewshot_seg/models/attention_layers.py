"""Post-norm attention / FFN layers shared by the POS transformer decoder and the Cross-Alignment block.

Names and init follow Mask2Former's ``SelfAttentionLayer`` / ``CrossAttentionLayer`` / ``FFNLayer`` (the
reference builds both its masked decoder and MM-Former's Cross-Alignment from them). Tensors are
sequence-first ``[L, B, C]`` as in ``nn.MultiheadAttention``; every layer is post-norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class _XavierLayer(nn.Module):
    """Base of the layers below: ``_reset_parameters`` re-initialises every matrix with Xavier-uniform."""

    def _reset_parameters(self) -> None:
        # Mask2Former's layers xavier every >1-dim parameter (in_proj, out_proj, linear1/2); 1-dim ones keep
        # their defaults (MHA biases 0, nn.Linear biases uniform, LayerNorm 1/0).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class SelfAttentionLayer(_XavierLayer):
    """``tgt = LN(tgt + SelfAttn(q = k = tgt + query_pos, v = tgt))``.

    Args:
        d_model: channels C.
        nhead: attention heads.
        dropout: attention and residual dropout.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()

    def forward(self, tgt: Tensor, query_pos: Tensor | None = None) -> Tensor:
        """tgt / query_pos ``[L, B, C]`` -> ``[L, B, C]``."""
        q = k = _with_pos(tgt, query_pos)
        out = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class CrossAttentionLayer(_XavierLayer):
    """``tgt = LN(tgt + Attn(q = tgt + query_pos, k = memory + pos, v = memory, mask))``.

    Args:
        d_model: channels C.
        nhead: attention heads.
        dropout: attention and residual dropout.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """Attend from the target tokens to the memory tokens.

        Args:
            tgt: ``[L, B, C]``.
            memory: ``[S, B, C]``.
            memory_mask: optional ``[B*nhead, L, S]`` bool (True = not allowed) or additive float mask.
            pos: optional ``[S, B, C]`` positional encoding of the memory (keys only).
            query_pos: optional ``[L, B, C]`` positional encoding of the target (queries only).

        Returns:
            ``[L, B, C]``.
        """
        out = self.multihead_attn(
            _with_pos(tgt, query_pos),
            _with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            need_weights=False,
        )[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(_XavierLayer):
    """``tgt = LN(tgt + linear2(ReLU(linear1(tgt))))``.

    Args:
        d_model: channels C.
        dim_feedforward: hidden width.
        dropout: hidden and residual dropout.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self._reset_parameters()

    def forward(self, tgt: Tensor) -> Tensor:
        """``[..., C] -> [..., C]``."""
        out = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm(tgt + self.dropout(out))


__all__ = ["CrossAttentionLayer", "FFNLayer", "SelfAttentionLayer"]
