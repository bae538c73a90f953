"""Time embeddings for conditioning a network on s and t - s."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a time in [0, 1]: (B,) -> (B, dim).

    emb(t) = [sin(1000 t w_k), cos(1000 t w_k)]_k with w_k = max_period^(-k / (dim/2)), the
    transformer/DDPM positional code (the paper reports positional embeddings more stable than
    random Fourier features).
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        if dim % 2:
            raise ValueError("positional embedding dimension must be even")
        k = torch.arange(dim // 2, dtype=torch.float64)
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * k / (dim // 2)).float(),
                             persistent=False)
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = (self.scale * t)[:, None] * self.freqs.to(t.dtype)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class RawTime(nn.Module):
    """The time itself as one feature: (B,) -> (B, 1)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None]
