"""Exact Gaussian oracle (docs/math.md, "Exact oracles").

Target x1 ~ N(mu, sigma^2 I), base x0 ~ N(0, c^2 I), any interpolant I_t = alpha_t x0 + beta_t x1:

    I_t ~ N(beta_t mu, s_t^2 I),      s_t^2 = c^2 alpha_t^2 + sigma^2 beta_t^2
    b_t(x) = betadot_t mu + (sdot_t / s_t)(x - beta_t mu)
    X_{s,t}(x) = beta_t mu + (s_t / s_s)(x - beta_s mu)

The map velocity v_{s,t}(x) = (X_{s,t}(x) - x) / (t - s) is written without dividing by t - s:

    v_{s,t}(x) = D[beta] mu + (D[s] / s_s)(x - beta_s mu),      D[f] = (f_t - f_s) / (t - s)

with D[alpha], D[beta] = int_0^1 fdot(s + theta (t - s)) dtheta by Gauss-Legendre quadrature (exact
for the linear schedule, to rounding for trig and any smooth schedule) and
D[s] = (c^2 D[alpha](alpha_t + alpha_s) + sigma^2 D[beta](beta_t + beta_s)) / (s_t + s_s).
So v is smooth across the diagonal, equals b_t there, and forward-mode derivatives in s and t are
exact and finite everywhere (no cancellation near s = t).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowspec.flowmap import FlowMap
from flowspec.interpolants import Interpolant, expand_as

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)  # on [-1, 1]


class GaussianOracle:
    """Exact quantities for x1 ~ N(mu, sigma^2 I) and x0 ~ N(0, c^2 I). A ``Teacher``: its
    ``velocity`` is b_t and its ``v`` the exact map velocity, so its map is the exact flow map.

    Args:
        interpolant: any Interpolant (only ``coefficients`` is used).
        mu: target mean, a scalar or a tensor of shape (D,).
        sigma: target standard deviation (scalar > 0).
        c: base scale (scalar > 0).
        dim: D for sampling when mu is a scalar (default 1); ignored when mu has shape (D,).
    """

    def __init__(self, interpolant: Interpolant, mu, sigma: float, c: float = 1.0,
                 dim: int | None = None):
        self.interpolant = interpolant
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.sigma, self.c = float(sigma), float(c)
        self.dim = self.mu.shape[0] if self.mu.dim() == 1 else (dim or 1)

    def _mu(self, x: torch.Tensor) -> torch.Tensor:
        return self.mu.to(device=x.device, dtype=x.dtype)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """s_t = sqrt(c^2 alpha_t^2 + sigma^2 beta_t^2), shape (B,)."""
        k = self.interpolant.coefficients(t)
        return torch.sqrt(self.c ** 2 * k.alpha ** 2 + self.sigma ** 2 * k.beta ** 2)

    def std_dot(self, t: torch.Tensor) -> torch.Tensor:
        """sdot_t = (c^2 alpha alphadot + sigma^2 beta betadot) / s_t, shape (B,)."""
        k = self.interpolant.coefficients(t)
        num = self.c ** 2 * k.alpha * k.alpha_dot + self.sigma ** 2 * k.beta * k.beta_dot
        return num / self.std(t)

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b_t(x) = betadot_t mu + (sdot_t / s_t)(x - beta_t mu); t (B,), x (B, D)."""
        k, mu = self.interpolant.coefficients(t), self._mu(x)
        rate = self.std_dot(t) / self.std(t)
        return expand_as(k.beta_dot, x) * mu + expand_as(rate, x) * (x - expand_as(k.beta, x) * mu)

    def flow(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """X_{s,t}(x) = beta_t mu + (s_t / s_s)(x - beta_s mu); s, t (B,), x (B, D)."""
        bs, bt = self.interpolant.coefficients(s).beta, self.interpolant.coefficients(t).beta
        mu, ratio = self._mu(x), self.std(t) / self.std(s)
        return expand_as(bt, x) * mu + expand_as(ratio, x) * (x - expand_as(bs, x) * mu)

    def _divided_differences(self, s: torch.Tensor, t: torch.Tensor):
        """(D[alpha], D[beta]) = int_0^1 (alphadot, betadot)(s + theta (t - s)) dtheta, each (B,)."""
        theta = torch.as_tensor((_NODES + 1) / 2, dtype=s.dtype, device=s.device)
        w = torch.as_tensor(_WEIGHTS / 2, dtype=s.dtype, device=s.device)
        r = s[:, None] + theta[None, :] * (t - s)[:, None]  # (B, Q)
        k = self.interpolant.coefficients(r.reshape(-1))
        da = (k.alpha_dot.reshape(r.shape) * w).sum(1)
        db = (k.beta_dot.reshape(r.shape) * w).sum(1)
        return da, db

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact map velocity (X_{s,t}(x) - x)/(t - s), = b_s(x) on the diagonal; shape of x."""
        ks, kt = self.interpolant.coefficients(s), self.interpolant.coefficients(t)
        da, db = self._divided_differences(s, t)
        ss, st = self.std(s), self.std(t)
        dstd = (self.c ** 2 * da * (kt.alpha + ks.alpha)
                + self.sigma ** 2 * db * (kt.beta + ks.beta)) / (st + ss)
        mu = self._mu(x)
        return expand_as(db, x) * mu + expand_as(dstd / ss, x) * (x - expand_as(ks.beta, x) * mu)

    def conditional_mean(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | I_t = x], E[x1 | I_t = x]), each shaped like x (Gaussian conditioning):

            E[x0 | I_t = x] = alpha_t c^2 / s_t^2 (x - beta_t mu)
            E[x1 | I_t = x] = mu + beta_t sigma^2 / s_t^2 (x - beta_t mu)

        The conditional law of (x0, x1) given I_t is Gaussian, hence symmetric about this mean:
        (2 m0 - x0, 2 m1 - x1) has the same I_t and the same conditional law (an antithetic pair).
        """
        k, mu = self.interpolant.coefficients(t), self._mu(x)
        var = expand_as(self.std(t) ** 2, x)
        dev = x - expand_as(k.beta, x) * mu
        m0 = expand_as(k.alpha, x) * self.c ** 2 / var * dev
        m1 = mu + expand_as(k.beta, x) * self.sigma ** 2 / var * dev
        return m0, m1

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x1 ~ N(mu, sigma^2 I): (n, D) float64."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mu + self.sigma * z

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 ~ N(0, c^2 I): (n, D) float64."""
        return self.c * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


class _NoNet(nn.Module):
    def forward(self, x, s, t):  # pragma: no cover - ExactFlowMap overrides v
        raise AssertionError("ExactFlowMap computes v itself")


class ExactFlowMap(FlowMap):
    """The oracle's flow map as a FlowMap, optionally perturbed:

        v_{s,t}(x) = v*_{s,t}(x) + w (eps (t - s) + diagonal_eps) sin(x)

    with v* the exact map velocity (:meth:`GaussianOracle.v`) and w a trainable scalar (init 1).
    eps != 0 breaks the off-diagonal but keeps v_{t,t} = b_t; diagonal_eps != 0 breaks the diagonal.
    forward / velocity / sample are FlowMap's: X = x + (t - s) v, velocity(t, x) = v_{t,t}(x).
    """

    def __init__(self, oracle: GaussianOracle, eps: float = 0.0, diagonal_eps: float = 0.0):
        super().__init__(_NoNet())
        self.oracle = oracle
        self.eps, self.diagonal_eps = float(eps), float(diagonal_eps)
        self.weight = nn.Parameter(torch.ones((), dtype=torch.float64))

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        amp = self.weight.to(x.dtype) * (self.eps * (t - s) + self.diagonal_eps)
        return self.oracle.v(s, t, x) + expand_as(amp, x) * torch.sin(x)


class PerturbedFlowMap(FlowMap):
    """The oracle's flow map moved along fixed directions by trainable weights w (init 0 = exact):

        v_{s,t}(x) = v*_{s,t}(x) + sum_k w_k phi_k(s, t, x)

    with v* the exact map velocity and the directions, each shaped like x,

        phi_0 = (t - s) sin(x),  phi_1 = (t - s) x,  phi_2 = (t - s),   (off-diagonal: keep v_{t,t} = b_t)
        phi_3 = sin(x),          phi_4 = 1                              (break the diagonal too)

    The gradient of a loss with respect to w is its directional derivative along these directions,
    which is what ``flowspec.testing.check_objective`` inspects. Set ``weights`` (shape (5,),
    float64) to perturb the map.
    """

    OFF_DIAGONAL = (0, 1, 2)
    DIAGONAL = (3, 4)

    def __init__(self, oracle: GaussianOracle, weights=None):
        super().__init__(_NoNet())
        self.oracle = oracle
        w = torch.zeros(5, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = nn.Parameter(w.clone())

    def directions(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """phi_0 ... phi_4, each shaped like x."""
        gap = expand_as(t - s, x)
        one = torch.ones_like(x)
        return [gap * torch.sin(x), gap * x, gap * one, torch.sin(x), one]

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(x.dtype)
        out = self.oracle.v(s, t, x)
        for k, phi in enumerate(self.directions(s, t, x)):
            out = out + w[k] * phi
        return out
