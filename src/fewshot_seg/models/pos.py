"""Potential Objects Segmenter (POS): Mask2Former semantic head without classifier."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from fewshot_seg.models.pixel_decoder import RESNET50_CHANNELS, MSDeformAttnPixelDecoder
from fewshot_seg.models.transformer_decoder import MaskedTransformerDecoder


class PotentialObjectsSegmenter(nn.Module):
    """Pixel decoder + masked-attention transformer decoder producing N class-agnostic mask proposals.

    Defaults are the paper configuration (SPEC §2): ResNet-50 inputs, conv/hidden/mask dim 256,
    6 deformable encoder layers (8 heads, 4 points, FFN 1024), 9 decoder layers (8 heads, FFN 2048),
    100 queries; 20.49 M parameters. Smaller values give CPU-sized demos (e.g. with resnet18
    ``in_channels={"res2": 64, "res3": 128, "res4": 256, "res5": 512}``, ``conv_dim=hidden_dim=64``).

    Args:
        in_channels: backbone channels of res2..res5.
        conv_dim: pixel-decoder width (divisible by ``norm_groups``).
        mask_dim: channels of the mask features / mask embeddings.
        hidden_dim: transformer-decoder width (a 1x1 projection is added when != ``conv_dim``).
        num_queries: N proposals.
        enc_layers, enc_heads, enc_ffn, enc_points: pixel-decoder encoder.
        dec_layers, dec_heads, dec_ffn: transformer decoder.
        dropout: all transformer dropouts (0 in the paper).
        norm_groups: GroupNorm groups of the pixel decoder.

    Forward:
        features: ``{"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}`` (H, W = padded size).
        returns ``{"pred_masks": [B, N, H/4, W/4]`` logits of the last layer,
        ``"aux_outputs": [{"pred_masks": [B, N, H/4, W/4]}] * dec_layers`` earliest first ``}``.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int] | None = None,
        conv_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        enc_layers: int = 6,
        enc_heads: int = 8,
        enc_ffn: int = 1024,
        enc_points: int = 4,
        dec_layers: int = 9,
        dec_heads: int = 8,
        dec_ffn: int = 2048,
        dropout: float = 0.0,
        norm_groups: int = 32,
        deform_attn: str | None = None,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            input_channels=dict(RESNET50_CHANNELS if in_channels is None else in_channels),
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            num_heads=enc_heads,
            num_encoder_layers=enc_layers,
            dim_feedforward=enc_ffn,
            num_points=enc_points,
            dropout=dropout,
            norm_groups=norm_groups,
            attn_impl=deform_attn,
        )
        self.transformer_decoder = MaskedTransformerDecoder(
            in_channels=conv_dim,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            nheads=dec_heads,
            dim_feedforward=dec_ffn,
            dec_layers=dec_layers,
            mask_dim=mask_dim,
            dropout=dropout,
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, object]:
        mask_features, multi_scale = self.pixel_decoder(features)
        out = self.transformer_decoder(multi_scale, mask_features)
        return {"pred_masks": out["pred_masks"], "aux_outputs": out["aux_outputs"]}
