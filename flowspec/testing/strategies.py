"""Hypothesis strategies for property tests of flowspec components (MATH.md's conventions).

    from hypothesis import given, settings
    from flowspec.testing import check_objective, strategies as fst

    @settings(max_examples=10, deadline=None)
    @given(oracle=fst.gaussian_oracles())
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


class QuadraticOptions(InterpolantOptions):
    k_alpha: float = Field(0.0, gt=-1, lt=1, description="curvature of alpha")
    k_beta: float = Field(0.0, gt=-1, lt=1, description="curvature of beta")


class Quadratic(Interpolant):
    """A family of valid schedules for tests: alpha_t = 1 - t + k_a t (1 - t), beta_t = t + k_b t (1 - t).

    alphadot_t = -1 + k_a (1 - 2t), betadot_t = 1 + k_b (1 - 2t). With |k| < 1 alpha decreases from
    1 to 0 and beta increases from 0 to 1, so alpha_t^2 + beta_t^2 > 0 on [0, 1].
    """

    Options = QuadraticOptions

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
    return st.builds(lambda i, g: g.oracle(i), schedules or interpolants(), targets or gaussian_targets())


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


__all__ = ["GaussianTarget", "Quadratic", "batch_shapes", "gaussian_oracles", "gaussian_targets",
           "interpolants", "time_pair", "time_pairs"]
