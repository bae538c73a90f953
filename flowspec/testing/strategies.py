"""Hypothesis strategies for property tests of flowspec components (docs/math.md, "Conventions").

    from hypothesis import given, settings
    from flowspec.testing import check_objective, strategies as fst

    @settings(max_examples=10, deadline=None)
    @given(oracle=fst.correlated_gaussian_oracles())
    def test_my_objective(oracle):
        check_objective(MyObjective, oracles=[oracle])

Every strategy draws float64 values; times always satisfy 0 <= s <= t <= 1 and include the edges
s = t, s = 0 and t = 1 with a fair probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from pydantic import Field

from flowspec.interpolants import Coefficients, Interpolant, InterpolantOptions, Linear, Trig
from flowspec.testing.oracles import GaussianOracle
from flowspec.testing.targets import CorrelatedGaussianOracle, MixtureOracle, random_rotation


class QuadraticOptions(InterpolantOptions):
    k_alpha: float = Field(0.0, gt=-1, lt=1, description="curvature of alpha")
    k_beta: float = Field(0.0, gt=-1, lt=1, description="curvature of beta")


class Quadratic(Interpolant):
    """A family of valid schedules for tests: alpha_t = 1 - t + k_a t (1 - t), beta_t = t + k_b t (1 - t).

    alphadot_t = -1 + k_a (1 - 2t), betadot_t = 1 + k_b (1 - 2t). With |k| < 1 alpha decreases from
    1 to 0 and beta increases from 0 to 1, so alpha_t^2 + beta_t^2 > 0 on [0, 1].
    """

    Options = QuadraticOptions
    options: QuadraticOptions

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        ka, kb = self.options.k_alpha, self.options.k_beta
        bump = t * (1 - t)
        return Coefficients(alpha=1 - t + ka * bump, beta=t + kb * bump,
                            alpha_dot=-1 + ka * (1 - 2 * t), beta_dot=1 + kb * (1 - 2 * t))


def interpolants() -> st.SearchStrategy[Interpolant]:
    """Valid interpolant schedules: linear, trig, and :class:`Quadratic` with random curvatures."""
    k = st.floats(-0.9, 0.9, allow_nan=False)
    quadratic = st.builds(lambda a, b: Quadratic(Quadratic.Options(k_alpha=a, k_beta=b)), k, k)
    return st.one_of(st.builds(Linear), st.builds(Trig), quadratic)


@dataclass(frozen=True)
class GaussianTarget:
    """x1 ~ N(mu, sigma^2 I) with base x0 ~ N(0, c^2 I); mu has D entries."""

    mu: tuple[float, ...]
    sigma: float
    c: float

    def oracle(self, interpolant: Interpolant) -> GaussianOracle:
        return GaussianOracle(interpolant, torch.tensor(self.mu, dtype=torch.float64), self.sigma, self.c)


def gaussian_targets(dims: st.SearchStrategy[int] = st.integers(1, 3)) -> st.SearchStrategy[GaussianTarget]:
    """Gaussian targets: mu in [-2, 2]^D, sigma in [0.3, 2], base scale c in [0.5, 1.5]."""
    coord = st.floats(-2.0, 2.0, allow_nan=False)
    return dims.flatmap(lambda d: st.builds(
        GaussianTarget, st.tuples(*[coord] * d), st.floats(0.3, 2.0), st.floats(0.5, 1.5)))


def gaussian_oracles(schedules: st.SearchStrategy[Interpolant] | None = None,
                     targets: st.SearchStrategy[GaussianTarget] | None = None
                     ) -> st.SearchStrategy[GaussianOracle]:
    """:class:`GaussianOracle` for a drawn schedule and Gaussian target (exact velocity and map)."""
    schedules = interpolants() if schedules is None else schedules
    targets = gaussian_targets() if targets is None else targets
    return st.builds(lambda i, g: g.oracle(i), schedules, targets)


def correlated_gaussian_oracles(schedules: st.SearchStrategy[Interpolant] | None = None,
                                dims: st.SearchStrategy[int] = st.integers(3, 4)
                                ) -> st.SearchStrategy[CorrelatedGaussianOracle]:
    """Full-covariance Gaussian targets with an anisotropic base (a flow map that mixes coordinates,
    Jacobian not symmetric): D >= 3, mu in [-2, 2]^D, base scales c in [0.4, 2]^D, data stds along
    the whitened axes in [0.3, 2]^D, a rotation drawn from a seed."""
    schedules = interpolants() if schedules is None else schedules

    def build(d: int):
        vec = lambda lo, hi: st.lists(st.floats(lo, hi), min_size=d, max_size=d)  # noqa: E731
        return st.builds(lambda i, mu, c, sig, seed: CorrelatedGaussianOracle(
            i, mu, c, random_rotation(d, torch.Generator().manual_seed(seed)), sig),
            schedules, vec(-2.0, 2.0), vec(0.4, 2.0), vec(0.3, 2.0), st.integers(0, 2 ** 31 - 1))

    return dims.flatmap(build)


def mixture_oracles(schedules: st.SearchStrategy[Interpolant] | None = None,
                    dims: st.SearchStrategy[int] = st.integers(2, 3)) -> st.SearchStrategy[MixtureOracle]:
    """Gaussian mixtures of 2 or 3 components (weights >= 0.1, means in [-2, 2]^D, stds in
    [0.3, 1.5]) with base scales c in [0.5, 1.5]^D: exact velocity, float64 ODE ground truth."""
    schedules = interpolants() if schedules is None else schedules

    def build(d: int):
        def make(i, k, raw_w, means, stds, c):
            w = torch.tensor(raw_w[:k], dtype=torch.float64)
            return MixtureOracle(i, w / w.sum(), [m[:d] for m in means[:k]], stds[:k], c[:d])
        vec = lambda lo, hi, m: st.lists(st.floats(lo, hi), min_size=m, max_size=m)  # noqa: E731
        return st.builds(make, schedules, st.integers(2, 3), vec(0.1, 1.0, 3),
                         st.lists(vec(-2.0, 2.0, d), min_size=3, max_size=3), vec(0.3, 1.5, 3), vec(0.5, 1.5, d))

    return dims.flatmap(build)


_EDGE_KINDS = ("interior", "diagonal", "from_zero", "to_one", "full", "near_diagonal")


@st.composite
def time_pair(draw) -> tuple[float, float]:
    """One (s, t) with 0 <= s <= t <= 1: interior, s = t, s = 0, t = 1, (0, 1), or t - s tiny."""
    kind = draw(st.sampled_from(_EDGE_KINDS))
    u = draw(st.floats(0.0, 1.0))
    v = draw(st.floats(0.0, 1.0))
    s, t = min(u, v), max(u, v)
    if kind == "diagonal":
        return u, u
    if kind == "from_zero":
        return 0.0, v
    if kind == "to_one":
        return u, 1.0
    if kind == "full":
        return 0.0, 1.0
    if kind == "near_diagonal":
        s = u * (1 - 1e-3)
        return s, s + 1e-3 * v
    return s, t


def time_pairs(min_size: int = 1, max_size: int = 16) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    """(s, t), two float64 tensors of shape (B,) with 0 <= s <= t <= 1, edges included."""
    return st.lists(time_pair(), min_size=min_size, max_size=max_size).map(
        lambda pairs: (torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                       torch.tensor([p[1] for p in pairs], dtype=torch.float64)))


def batch_shapes(max_batch: int = 8, shapes: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (2, 2), (1, 2, 2))
                 ) -> st.SearchStrategy[tuple[int, ...]]:
    """(B, *shape): B in [1, max_batch] and a per-sample shape (vectors and small images)."""
    return st.tuples(st.integers(1, max_batch), st.sampled_from(shapes)).map(lambda bs: (bs[0], *bs[1]))


__all__ = ["GaussianTarget", "Quadratic", "batch_shapes", "correlated_gaussian_oracles", "gaussian_oracles",
           "gaussian_targets", "interpolants", "mixture_oracles", "time_pair", "time_pairs"]
