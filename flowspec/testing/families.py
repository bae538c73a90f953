"""An exact-capable family of flow maps for descent checks: the exact map plus a learned correction
affine in x with time-dependent, dense coefficients.

    v_{s,t}(x) = v*_{s,t}(x) + (t - s) (A_theta(s, t) (x - m) + a_theta(s, t))

v* is an oracle's exact map velocity, m a fixed centre (the oracle's data mean, so corrections do not
grow with |mu|), and (A, a) of shape (D, D) and (D,) come out of a small MLP in (s, t): a frozen,
seeded first layer h = tanh(P [s, t, 1]) of ``hidden`` units, then the trainable output layer
theta: (A, a) = theta h. theta = 0 is the exact map. The factor (t - s) keeps the diagonal
v_{t,t} = b_t for every theta, so the self-distillation target is exact whatever theta is, and the
off-diagonal loss has the exact map as its only minimizer in the family. Every coordinate of the
correction mixes every coordinate of x, and the coefficients vary with both times: a perturbation
theta = eps d moves the Jacobian of X off its structure (dense, time-dependent).
"""

from __future__ import annotations

import torch
from torch import nn

from flowspec.flowmap import FlowMap


class _NoNet(nn.Module):
    def forward(self, x, s, t):  # pragma: no cover - AffineFlowMap computes v itself
        raise AssertionError("AffineFlowMap computes v itself")


class AffineFlowMap(FlowMap):
    """The family above for an oracle with ``v(s, t, x)`` and vectors x of shape (B, D).

    Args:
        oracle: exact map velocity v* (GaussianOracle, CorrelatedGaussianOracle).
        dim: D.
        hidden: units of the frozen first layer.
        seed: seeds the first layer.
    Attributes:
        theta: (D * D + D, hidden) float64 parameter, zero at the exact map.
    """

    proj: torch.Tensor
    centre: torch.Tensor

    def __init__(self, oracle, dim: int, hidden: int = 6, seed: int = 0):
        super().__init__(_NoNet())
        self.oracle, self.dim = oracle, dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", 2.0 * torch.randn(hidden, 3, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.zeros(dim * dim + dim, hidden, dtype=torch.float64))
        mu = getattr(oracle, "mu", torch.zeros(dim))
        self.register_buffer("centre", torch.as_tensor(mu, dtype=torch.float64).expand(dim).clone())

    def features(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """h = tanh(P [s, t, 1]), (B, hidden)."""
        st = torch.stack([s, t, torch.ones_like(s)], 1)
        return torch.tanh(st @ self.proj.to(st).T)

    def correction(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A(s, t)(x - m) + a(s, t), (B, D)."""
        out = self.features(s, t) @ self.theta.to(x.dtype).T  # (B, D * D + D)
        d = self.dim
        a_mat = out[:, : d * d].reshape(-1, d, d)
        return (a_mat @ (x - self.centre.to(x))[:, :, None])[:, :, 0] + out[:, d * d:]

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.oracle.v(s, t, x) + (t - s)[:, None] * self.correction(s, t, x)

    def direction(self, generator: torch.Generator, eps: float) -> torch.Tensor:
        """A random perturbation of theta (same shape), scaled so that each entry of (A, a) moves by
        about eps at a typical (s, t)."""
        d = torch.randn(self.theta.shape, generator=generator, dtype=torch.float64)
        return eps * d / self.theta.shape[1] ** 0.5


__all__ = ["AffineFlowMap"]
