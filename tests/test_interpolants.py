"""Interpolant schedules against docs/math.md, "Stochastic interpolant": boundary values, derivatives,
I_t and dI_t/dt."""

from __future__ import annotations

import math

import pytest
import torch

from flowspec.interpolants import Linear, Trig

# Independent transcription of the schedules of docs/math.md, "Stochastic interpolant": (alpha, beta,
# alphadot, betadot) as functions of t.
SCHEDULES = {
    "linear": (Linear, lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t), lambda t: torch.ones_like(t)),
    "trig": (Trig, lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2),
             lambda t: -math.pi / 2 * torch.sin(math.pi * t / 2),
             lambda t: math.pi / 2 * torch.cos(math.pi * t / 2)),
}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]


def test_boundary_conditions(schedule):
    k = schedule[0]().coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(k.alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(k.beta, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)


def test_values_match_transcription(schedule):
    cls, a, b, ad, bd = schedule
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    k = cls().coefficients(t)
    for got, want in [(k.alpha, a(t)), (k.beta, b(t)), (k.alpha_dot, ad(t)), (k.beta_dot, bd(t))]:
        assert got.shape == t.shape
        torch.testing.assert_close(got, want, atol=1e-15, rtol=0)


def test_derivatives_match_central_differences(schedule):
    interp, h = schedule[0](), 1e-5
    t = torch.linspace(0.01, 0.99, 25, dtype=torch.float64)
    k, kp, km = interp.coefficients(t), interp.coefficients(t + h), interp.coefficients(t - h)
    torch.testing.assert_close(k.alpha_dot, (kp.alpha - km.alpha) / (2 * h), atol=1e-9, rtol=0)
    torch.testing.assert_close(k.beta_dot, (kp.beta - km.beta) / (2 * h), atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)])
def test_interpolate(schedule, shape):
    cls, a, b, ad, bd = schedule
    g = torch.Generator().manual_seed(0)
    n = 5
    t = torch.rand(n, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    it, dit = cls().interpolate(t, x0, x1)
    for i in range(n):  # per sample, no broadcasting helpers
        ti = t[i : i + 1]
        torch.testing.assert_close(it[i], a(ti)[0] * x0[i] + b(ti)[0] * x1[i], atol=1e-15, rtol=0)
        torch.testing.assert_close(dit[i], ad(ti)[0] * x0[i] + bd(ti)[0] * x1[i], atol=1e-15, rtol=0)
    # endpoints: I_0 = x0, I_1 = x1
    it0, _ = cls().interpolate(torch.zeros(n, dtype=torch.float64), x0, x1)
    it1, _ = cls().interpolate(torch.ones(n, dtype=torch.float64), x0, x1)
    torch.testing.assert_close(it0, x0, atol=1e-15, rtol=0)
    torch.testing.assert_close(it1, x1, atol=1e-15, rtol=0)
