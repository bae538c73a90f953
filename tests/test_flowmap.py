"""FlowMap parameterization (docs/math.md, "Flow map and its parameterization") and the exact oracle."""

from __future__ import annotations

import pytest
import torch

from flowspec.interpolants import Linear, Trig
from flowspec.jvp import jvp
from flowspec.testing import ExactFlowMap, GaussianOracle

F64 = torch.float64
B, D = 8, 2


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(B, generator=g, dtype=F64) * 0.5
    t = s + torch.rand(B, generator=g, dtype=F64) * 0.5
    x = torch.randn(B, D, generator=g, dtype=F64)
    return s, t, x


def oracles():
    mu = torch.tensor([0.8, -0.5], dtype=F64)
    return [GaussianOracle(I(), mu, sigma=1.3, c=c) for I in (Linear, Trig) for c in (1.0, 0.7)]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_identity_on_diagonal(mlp_map, data, scale):
    s, _, x = data
    mlp_map.scale = scale
    assert torch.equal(mlp_map(s, s, x), x)


def test_parameterization(mlp_map, data):
    s, t, x = data
    v = mlp_map.net(x, s, t)
    torch.testing.assert_close(mlp_map(s, t, x), x + (t - s)[:, None] * v, atol=0, rtol=0)
    torch.testing.assert_close(mlp_map.velocity(t, x), mlp_map.net(x, t, t), atol=0, rtol=0)


def test_tangent_condition(mlp_map, data):
    """d/dt X_{s,t}(x) at t = s equals v_{s,s}(x)."""
    s, _, x = data
    _, dX_dt = jvp(lambda tt: mlp_map(s, tt, x), (s.clone(),), (torch.ones_like(s),))
    torch.testing.assert_close(dX_dt, mlp_map.velocity(s, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sample_composes_uniform_grid(mlp_map, data, steps):
    _, _, x0 = data
    x = x0
    for k in range(steps):
        s = torch.full((B,), k / steps, dtype=F64)
        t = torch.full((B,), (k + 1) / steps, dtype=F64)
        x = x + (t - s)[:, None] * mlp_map.net(x, s, t)
    torch.testing.assert_close(mlp_map.sample(x0, steps=steps), x, atol=1e-14, rtol=0)
    with pytest.raises(ValueError):
        mlp_map.sample(x0)


@pytest.mark.parametrize("oracle", oracles())
def test_oracle_semigroup_and_velocity(oracle, data):
    s, t, x = data
    u = s + 0.3 * (t - s)
    torch.testing.assert_close(oracle.flow(u, t, oracle.flow(s, u, x)), oracle.flow(s, t, x),
                               atol=1e-13, rtol=0)
    torch.testing.assert_close(oracle.flow(s, s, x), x, atol=1e-15, rtol=0)
    # velocity = d/dt X_{s,t}(x) at X, by forward mode and by central differences
    _, dX = torch.func.jvp(lambda tt: oracle.flow(s, tt, x), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dX, oracle.velocity(t, oracle.flow(s, t, x)), atol=1e-13, rtol=0)
    h = 1e-5
    fd = (oracle.flow(s, t + h, x) - oracle.flow(s, t - h, x)) / (2 * h)
    torch.testing.assert_close(fd, dX, atol=1e-8, rtol=0)
    # std: s_t^2 = c^2 alpha^2 + sigma^2 beta^2; its derivative
    k = oracle.interpolant.coefficients(t)
    torch.testing.assert_close(oracle.std(t) ** 2, oracle.c**2 * k.alpha**2 + oracle.sigma**2 * k.beta**2)
    torch.testing.assert_close(oracle.std_dot(t), (oracle.std(t + h) - oracle.std(t - h)) / (2 * h),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("oracle", oracles())
def test_oracle_marginals(oracle):
    """X_{0,t} pushes the base onto Law(I_t) = N(beta_t mu, s_t^2 I) (moments of 200k samples)."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = oracle.sample_base(n, g)
    assert x0.shape == (n, D)
    torch.testing.assert_close(x0.std(0), torch.full((D,), oracle.c, dtype=F64), atol=0.01, rtol=0)
    x1 = oracle.flow(torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64), x0)
    torch.testing.assert_close(x1.mean(0), oracle.mu, atol=0.015, rtol=0)
    torch.testing.assert_close(x1.std(0), torch.full((D,), oracle.sigma, dtype=F64), atol=0.015, rtol=0)
    data = oracle.sample_data(n, g)
    torch.testing.assert_close(data.mean(0), oracle.mu, atol=0.015, rtol=0)
    torch.testing.assert_close(data.std(0), torch.full((D,), oracle.sigma, dtype=F64), atol=0.015, rtol=0)


@pytest.mark.parametrize("oracle", oracles())
def test_exact_flow_map(oracle, data):
    s, t, x = data
    fm = ExactFlowMap(oracle)
    torch.testing.assert_close(fm(s, t, x), oracle.flow(s, t, x), atol=1e-14, rtol=0)
    torch.testing.assert_close(fm.v(s, t, x), (oracle.flow(s, t, x) - x) / (t - s)[:, None],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(fm.velocity(t, x), oracle.velocity(t, x), atol=1e-14, rtol=0)
    torch.testing.assert_close(oracle.v(s, t, x), fm.v(s, t, x), atol=0, rtol=0)
    ones = torch.ones(B, dtype=F64)
    zeros, full = torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64)
    for steps in (1, 3):
        torch.testing.assert_close(fm.sample(x, steps=steps), oracle.flow(zeros, full, x),
                                   atol=1e-13, rtol=0)
    # forward-mode derivatives stay exact arbitrarily close to the diagonal
    for gap in (0.0, 1e-12, 1e-6):
        tt = s + gap
        _, dX_dt = jvp(lambda r: fm(s, r, x), (tt,), (ones,))
        torch.testing.assert_close(dX_dt, oracle.velocity(tt, fm(s, tt, x)), atol=1e-12, rtol=0)
        _, dX_ds = jvp(lambda r, tt=tt: fm(r, tt, x), (s,), (ones,))
        _, adv = jvp(lambda y, tt=tt: fm(s, tt, y), (x,), (oracle.velocity(s, x),))
        torch.testing.assert_close(dX_ds + adv, torch.zeros_like(x), atol=1e-12, rtol=0)
    # perturbations: eps keeps the diagonal, diagonal_eps breaks it
    pert = ExactFlowMap(oracle, eps=0.1)
    torch.testing.assert_close(pert.velocity(t, x), oracle.velocity(t, x), atol=1e-14, rtol=0)
    assert (pert(s, t, x) - oracle.flow(s, t, x)).abs().max() > 1e-3
    assert (ExactFlowMap(oracle, diagonal_eps=0.1).velocity(t, x) - oracle.velocity(t, x)).abs().max() > 1e-2
    assert [n for n, p in pert.named_parameters() if p.requires_grad] == ["weight"]
