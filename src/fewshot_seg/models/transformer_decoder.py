"""Mask2Former masked-attention transformer decoder without class head (the POS decoder).

Parameter names follow the reference checkpoint (``sem_seg_head.predictor.*``). Attention tensors are
sequence-first ``[L, B, C]`` as in ``nn.MultiheadAttention``; every layer is post-norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_seg.models.attention_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from fewshot_seg.models.linear import linear_rows
from fewshot_seg.models.position_encoding import PositionEmbeddingSine


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``.layers``, reference name)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim] -> [..., output_dim]``."""
        lead = x.shape[:-1]
        for i, layer in enumerate(self.layers):
            x = linear_rows(x, layer.weight, layer.bias)  # [rows, out]: one view in, one out
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.view(*lead, -1)


class MaskedTransformerDecoder(nn.Module):
    """Learned queries refined by masked cross-attention over the pixel decoder's levels.

    Layer i attends to level ``i % num_feature_levels`` (1/32, 1/16, 1/8 round-robin) and only where the
    previous prediction says foreground (sigmoid >= 0.5); a fully masked row is unmasked.

    Args:
        in_channels: channels of the multi-scale features (1x1 projection if != ``hidden_dim``).
        hidden_dim, num_queries, nheads, dim_feedforward, dec_layers, mask_dim, dropout: as Mask2Former.
        num_feature_levels: number of levels used round-robin.
    """

    def __init__(
        self,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
    ) -> None:
        super().__init__()
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        # Built layer by layer (self, cross, FFN) in the reference's order, so the random draws come in its
        # order too; each layer xaviers its own matrices (Mask2Former's _reset_parameters).
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(SelfAttentionLayer(hidden_dim, nheads, dropout))
            self.transformer_cross_attention_layers.append(CrossAttentionLayer(hidden_dim, nheads, dropout))
            self.transformer_ffn_layers.append(FFNLayer(hidden_dim, dim_feedforward, dropout))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        # The reference has no input projections at in_channels == hidden_dim (identity, no keys).
        projs: list[nn.Module] = []
        for _ in range(num_feature_levels):
            if in_channels == hidden_dim:
                projs.append(nn.Identity())
            else:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                projs.append(conv)
        self.input_proj = nn.ModuleList(projs)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, multi_scale_features: Sequence[Tensor], mask_features: Tensor) -> dict[str, object]:
        """Predict mask logits for every query.

        Args:
            multi_scale_features: ``num_feature_levels`` maps ``[B, in_channels, h_l, w_l]`` ordered
                1/32, 1/16, 1/8.
            mask_features: ``[B, mask_dim, H/4, W/4]``.

        Returns:
            ``pred_masks [B, Q, H/4, W/4]`` (after the last layer), ``aux_outputs`` = ``dec_layers`` dicts
            ``{"pred_masks": [B, Q, H/4, W/4]}`` (before any layer, then after layers 0..dec_layers-2,
            earliest first), ``mask_embeds [B, Q, mask_dim]`` and ``decoder_output [B, Q, C]`` of the
            final prediction.
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}"
            )
        srcs, pos, sizes = [], [], []
        for lvl, x in enumerate(multi_scale_features):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).permute(2, 0, 1).to(x.dtype))  # [HW, B, C]
            src = self.input_proj[lvl](x).flatten(2) + self.level_embed.weight[lvl][None, :, None]
            srcs.append(src.permute(2, 0, 1))  # [HW, B, C]
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)  # [Q, B, C]

        predictions: list[Tensor] = []
        pred, attn_mask, _, _ = self._predict(output, mask_features, sizes[0])
        predictions.append(pred)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, srcs[lvl], memory_mask=attn_mask, pos=pos[lvl], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            pred, attn_mask, mask_embeds, decoder_output = self._predict(output, mask_features, next_size)
            predictions.append(pred)
        return {
            "pred_masks": predictions[-1],
            "aux_outputs": [{"pred_masks": p} for p in predictions[:-1]],
            "mask_embeds": mask_embeds,
            "decoder_output": decoder_output,
        }

    def _predict(
        self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mask logits ``[B, Q, H/4, W/4]`` and the boolean attention mask ``[B, 1, Q, h*w]`` (all heads) for
        the next layer (True = not allowed), plus mask embeddings and the normed decoder output."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # [B, Q, C]
        mask_embeds = self.mask_embed(decoder_output)
        b, _, h, w = mask_features.shape
        # The product einsum("bqc,bchw->bqhw") runs, without its permutes and views.
        pred = torch.bmm(mask_embeds, mask_features.flatten(2)).view(b, -1, h, w)
        with torch.no_grad():
            small = F.interpolate(pred.detach(), size=attn_size, mode="bilinear", align_corners=False)
            attn_mask = small.sigmoid().view(b, 1, -1, attn_size[0] * attn_size[1]) < 0.5
            # A query whose mask covers nothing would attend to nothing: let it see the whole level.
            attn_mask &= ~attn_mask.all(dim=-1, keepdim=True)
        return pred, attn_mask, mask_embeds, decoder_output
