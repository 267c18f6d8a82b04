"""Sine positional encoding shared by the pixel decoder, the transformer decoder and Mask Matching."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewshot_seg.models.size_cache import SizeCache


class PositionEmbeddingSine(nn.Module):
    """DETR-style 2-D sine/cosine positional encoding.

    Args:
        num_pos_feats: channels per axis F; the output has 2F channels (rows first, then columns).
        temperature: base of the geometric frequency progression.
        normalize: scale the running position count of each axis to (0, 2*pi].
        scale: the range used when ``normalize`` is set.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("`scale` is only used together with `normalize=True`")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        # Input sizes vary (tests, several sizes): a small cache.
        self._cache: SizeCache[Tensor] = SizeCache(16)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode the positions of ``x`` (:meth:`encode`); without a mask the encoding depends on the
        shape alone, so it is computed once per (shape, device) and then returned from a cache (about 25
        tensor operations saved per call; callers use it out of place)."""
        if mask is not None:
            return self.encode(x, mask)
        return self._cache.get((tuple(x.shape[:1] + x.shape[2:]), x.device), lambda: self._encode_no_grad(x))

    def _encode_no_grad(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encode(x)

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode the positions of ``x``.

        Args:
            x: ``[B, C, H, W]``; only its shape, device and dtype are used.
            mask: optional ``[B, H, W]`` bool, True marks padding (excluded from the running count).

        Returns:
            ``[B, 2F, H, W]`` float32 positional encoding.
        """
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros((b, h, w), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Channel 2k carries sin and 2k+1 cos of the same frequency (interleaved, as the reference).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
