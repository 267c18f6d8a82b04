"""Post-norm attention / FFN layers shared by the POS transformer decoder and the Cross-Alignment block.

Names and init follow Mask2Former's ``SelfAttentionLayer`` / ``CrossAttentionLayer`` / ``FFNLayer`` (the
reference builds both its masked decoder and MM-Former's Cross-Alignment from them). Tensors are
sequence-first ``[L, B, C]`` as in ``nn.MultiheadAttention``; every layer is post-norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.linear import linear_rows


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def multi_head_attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """``mha(query, key, value, attn_mask=attn_mask, need_weights=False)[0]`` in fewer operations.

    The arithmetic of ``F.multi_head_attention_forward`` (three in-projections of the packed weight, one
    ``scaled_dot_product_attention``, the output projection) on tensors of the same strides, so the same
    bits (tests/test_host_overhead.py), without its checks, mask conversions and intermediate views:
    about 20 operations per call instead of 30 to 40, forward and backward.

    Args:
        mha: the module whose parameters, heads and dropout are used (``batch_first=False``, one packed
            in-projection, no ``bias_k``/``bias_v``).
        query: ``[L, B, E]``; key, value: ``[S, B, E]``.
        attn_mask: optional; True / ``-inf`` = not allowed. ``[B*heads, L, S]`` as ``nn.MultiheadAttention``
            takes it, or anything that broadcasts to ``[B, heads, L, S]`` (``[B, 1, L, S]``: one mask for
            all heads, not repeated).

    Returns:
        ``[L, B, E]``.
    """
    length, batch, embed = query.shape
    heads = mha.num_heads
    head_dim = embed // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = linear_rows(query, w_q, b_q).view(length, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = linear_rows(key, w_k, b_k).view(-1, batch, heads, head_dim).permute(1, 2, 0, 3)
    v = linear_rows(value, w_v, b_v).view(-1, batch, heads, head_dim).permute(1, 2, 0, 3)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # As nn.MultiheadAttention: an additive mask in the query's dtype.
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask, float("-inf"))
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, length, -1)
    dropout = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout)  # [B, heads, L, head_dim]
    out = out.permute(2, 0, 1, 3).reshape(length * batch, embed)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(length, batch, embed)


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
        out = multi_head_attention(self.self_attn, q, k, tgt)
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
            memory_mask: optional ``[B*nhead, L, S]`` or ``[B, 1, L, S]`` (all heads) bool (True = not
                allowed) or additive float mask.
            pos: optional ``[S, B, C]`` positional encoding of the memory (keys only).
            query_pos: optional ``[L, B, C]`` positional encoding of the target (queries only).

        Returns:
            ``[L, B, C]``.
        """
        out = multi_head_attention(
            self.multihead_attn, _with_pos(tgt, query_pos), _with_pos(memory, pos), memory, memory_mask
        )
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
        hidden = self.dropout(F.relu(linear_rows(tgt, self.linear1.weight, self.linear1.bias)))
        out = self.linear2(hidden).view(tgt.shape)
        return self.norm(tgt + self.dropout(out))


__all__ = ["CrossAttentionLayer", "FFNLayer", "SelfAttentionLayer", "multi_head_attention"]
