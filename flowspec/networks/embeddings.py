"""Time embeddings for conditioning a network on two times, (s, t) or (s, t - s).

Each maps a (B,) tensor of times in [0, 1] to (B, dim) features. Which one a network uses matters
more than it looks: the Lagrangian and Eulerian objectives differentiate the network in t and s, so
the embedding's own derivative, up to ``scale * max frequency``, enters every tangent.

* :class:`RawTime`: the time itself, one feature (the reference MLP of the self-distillation paper
  feeds [s, t, x / c] to its first layer).
* :class:`PositionalEmbedding`: log-spaced sinusoids of ``scale * t``. With ``scale = 1000`` this is
  the DDPM/transformer code (derivatives up to 1000); with ``scale = 1`` and ``magnitude_preserving``
  it is the EDM2 U-Net's embedding, whose features have unit second moment (sqrt(2) [sin, cos]) and
  frequencies at most 1, so d/dt of the embedding is O(1).
* :class:`FourierEmbedding`: random Fourier features sin/cos(2 pi f_k t), f_k ~ N(0, scale^2) fixed
  at construction (seeded, stored in the state dict).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RawTime(nn.Module):
    """The time itself as one feature: (B,) -> (B, 1)."""

    dim = 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None]


class PositionalEmbedding(nn.Module):
    """Sinusoids of a time: (B,) -> (B, dim).

    emb(t) = a [sin(scale t w_k), cos(scale t w_k)]_k, w_k = max_period^(-k / (dim / 2)),
    k = 0 .. dim/2 - 1, with a = sqrt(2) when ``magnitude_preserving`` (unit mean square over the
    features) and 1 otherwise.
    """

    freqs: torch.Tensor  # a buffer (nn.Module's attribute lookup is untyped)

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10_000.0,
                 magnitude_preserving: bool = False):
        super().__init__()
        if dim % 2:
            raise ValueError("positional embedding dimension must be even")
        self.dim = dim
        k = torch.arange(dim // 2, dtype=torch.float64)
        self.register_buffer("freqs", (scale * torch.exp(-math.log(max_period) * k / (dim // 2))).float(),
                             persistent=False)
        self.amplitude = math.sqrt(2.0) if magnitude_preserving else 1.0

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        return emb * self.amplitude if self.amplitude != 1.0 else emb


class FourierEmbedding(nn.Module):
    """Random Fourier features: (B,) -> (B, dim), [cos(2 pi f_k t), sin(2 pi f_k t)]_k with
    f_k ~ N(0, scale^2) drawn once from a fixed seed (so two networks of one spec agree)."""

    freqs: torch.Tensor  # a buffer

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError("Fourier embedding dimension must be even")
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * scale * torch.randn(dim // 2, generator=g))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
