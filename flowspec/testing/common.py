"""Shared pieces of the property checks: the failure type, dtypes, tolerances, edge times, oracles."""

from __future__ import annotations

import torch

from flowspec.interpolants import Linear, Trig
from flowspec.objectives.base import upper_triangle
from flowspec.testing.oracles import GaussianOracle

F32, F64 = torch.float32, torch.float64

#: a quantity that vanishes at the exact map (residual, gradient), relative to its own scale, must be
#: below this with the exact jvp; see :func:`zero_tolerance` for finite differences
ZERO_TOL = {F64: 1e-8, F32: 1e-4}


class CheckFailed(AssertionError):
    """A property check failed; the message lists every failing property, one per line."""


def zero_tolerance(dtype: torch.dtype, strategy: str = "exact") -> float:
    """What "zero" means for a residual relative to its own scale, by dtype and jvp strategy.

    Exact forward mode: ZERO_TOL (rounding only). Central differences with flowspec.jvp's default
    step h = eps^(1/3) / 1000 carry a rounding error of about eps / h per unit of the function
    (3.7e-8 in float64, 0.024 in float32: float32 differences keep two digits); the tolerance is
    4 eps / h, or ZERO_TOL where that is larger.
    """
    if strategy != "finite_difference":
        return ZERO_TOL[dtype]
    eps = torch.finfo(dtype).eps
    return max(ZERO_TOL[dtype], 4 * eps / (eps ** (1 / 3) / 1000))


def edge_times(dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs at the edges of 0 <= s <= t <= 1: the diagonal, s = 0, t = 1, (0, 1), t - s = 1e-3."""
    pairs = [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.3, 0.301), (0.999, 1.0)]
    return (torch.tensor([p[0] for p in pairs], dtype=dtype), torch.tensor([p[1] for p in pairs], dtype=dtype))


def sample_times(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 edge pairs, then n - 8 pairs uniform on the triangle s <= t (the objectives' own
    :func:`~flowspec.objectives.base.upper_triangle`); float64 (max(n, 8),) each."""
    es, et = edge_times()
    s, t = upper_triangle(max(n - len(es), 0), dtype=F64, generator=generator)
    return torch.cat([es, s]), torch.cat([et, t])


def default_oracles(dim: int = 2) -> list:
    """The oracles check_objective uses when none are given, two of each kind, linear and trig:

    * an isotropic Gaussian N((0.8, -0.5), 1.3^2 I) with base scale 1 (GaussianOracle);
    * a full-covariance Gaussian in 3-D with an anisotropic base (random rotation, seeds 1 and 2:
      :func:`flowspec.testing.targets.correlated_gaussian`), whose flow map mixes coordinates and
      whose Jacobian is not symmetric.
    """
    from flowspec.testing.targets import correlated_gaussian

    mu = torch.tensor([0.8, -0.5, 0.3][:dim], dtype=F64)
    iso = [GaussianOracle(i, mu, sigma=1.3, c=1.0) for i in (Linear(), Trig())]
    return iso + [correlated_gaussian(i, 3, seed) for i, seed in ((Linear(), 1), (Trig(), 2))]


def describe_oracle(oracle) -> str:
    """One short line naming an oracle (its own ``describe()`` where it has one)."""
    if hasattr(oracle, "describe"):
        return oracle.describe()
    mu = [round(v, 3) for v in oracle.mu.reshape(-1).tolist()]
    return (f"{type(oracle.interpolant).__name__} N({mu[0] if len(mu) == 1 else mu}, {oracle.sigma:.3g}^2), "
            f"c={oracle.c:.3g}")


def antithetic(oracle, times: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
    """Append to (x0, x1) their reflections about E[(x0, x1) | I_t]: same I_t, opposite noise."""
    xt, _ = oracle.interpolant.interpolate(times, x0, x1)
    m0, m1 = oracle.conditional_mean(times, xt)
    return torch.cat([x0, 2 * m0 - x0]), torch.cat([x1, 2 * m1 - x1])


def rms(x: torch.Tensor) -> float:
    """sqrt(mean over samples of |x|^2 summed over the other dimensions)."""
    return float(x.detach().double().pow(2).flatten(1).sum(1).mean().sqrt()) if x.numel() else 0.0
