"""Learned loss weighting (docs/math.md, "Residual loss per sample"): a log-variance w_{s,t}.

Each per-sample term |r|^2 becomes exp(-w_{s,t}) |r|^2 + w_{s,t}, with w a small network of (s, t)
trained jointly with the map (its minimizer over w is log |r|^2: the loss balances itself across
times). The network is a submodule of the FlowMap (``FlowMap.log_weight``), so it is optimized,
averaged (EMA) and checkpointed with the model and needs no state of its own.
"""

from __future__ import annotations

import torch
from torch import nn


class LogVarianceWeight(nn.Module):
    """w_{s,t} = MLP(s, t - s, sin/cos features): (B,), (B,) -> (B,); initialized to exactly 0.

    Args:
        width: hidden units.
        frequencies: Fourier features per input (k pi s, k pi (t - s), k = 1..frequencies).
    """

    k: torch.Tensor  # a buffer (nn.Module's attribute lookup is untyped)

    def __init__(self, width: int = 64, frequencies: int = 4):
        super().__init__()
        self.register_buffer("k", torch.arange(1, frequencies + 1, dtype=torch.float32) * torch.pi)
        d = 2 + 4 * frequencies
        hidden, out = nn.Linear(d, width), nn.Linear(width, 1)  # hidden first: the order of the seeded draws
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(hidden, nn.SiLU(), out)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype  # the first layer's weight
        a, h = s.to(dtype)[:, None], (t - s).to(dtype)[:, None]
        feats = [a, h, torch.sin(a * self.k), torch.cos(a * self.k), torch.sin(h * self.k), torch.cos(h * self.k)]
        return self.net(torch.cat(feats, 1))[:, 0].to(s.dtype)

