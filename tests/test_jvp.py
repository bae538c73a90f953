"""flowspec.jvp: exact forward mode against finite differences, and gradients through it."""

from __future__ import annotations

import pytest
import torch

from flowspec.jvp import jvp

F64 = torch.float64
B, D = 6, 2


@pytest.fixture
def point():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(B, generator=g, dtype=F64) * 0.5
    t = s + 0.1 + torch.rand(B, generator=g, dtype=F64) * 0.4
    x = torch.randn(B, D, generator=g, dtype=F64)
    b = torch.randn(B, D, generator=g, dtype=F64)
    return s, t, x, b


def cases(mlp_map, s, t, x, b):
    """(name, f, primals, tangents) for tangents in t, in s, in x, and augmented (s, x)."""
    one = torch.ones_like(s)
    return [
        ("t", lambda tt: mlp_map(s, tt, x), (t,), (one,)),
        ("s", lambda ss: mlp_map(ss, t, x), (s,), (one,)),
        ("x", lambda xx: mlp_map(s, t, xx), (x,), (b,)),
        ("sx", lambda ss, xx: mlp_map(ss, t, xx), (s, x), (one, b)),
    ]


def central(f, primals, tangents, h):
    plus = f(*(p + h * u for p, u in zip(primals, tangents)))
    minus = f(*(p - h * u for p, u in zip(primals, tangents)))
    return (plus - minus) / (2 * h)


def test_exact_matches_central_differences(mlp_map, point):
    for name, f, p, u in cases(mlp_map, *point):
        value, tangent = jvp(f, p, u, strategy="exact")
        torch.testing.assert_close(value, f(*p), atol=1e-14, rtol=0)
        # h = 1e-7: the positional time embedding has frequencies up to 1000, so the truncation
        # error h^2 f'''/6 needs a small step; rounding error ~ 1e-16 / h stays below 1e-8.
        torch.testing.assert_close(tangent, central(f, p, u, 1e-7), atol=1e-7, rtol=0, msg=name)


def test_augmented_is_sum_of_partials(mlp_map, point):
    s, t, x, b = point
    one = torch.ones_like(s)
    _, both = jvp(lambda ss, xx: mlp_map(ss, t, xx), (s, x), (one, b))
    _, ds = jvp(lambda ss: mlp_map(ss, t, x), (s,), (one,))
    _, dx = jvp(lambda xx: mlp_map(s, t, xx), (x,), (b,))
    torch.testing.assert_close(both, ds + dx, atol=1e-13, rtol=0)


@pytest.mark.parametrize("step", [None, 1e-7])
def test_finite_difference_strategy_matches_exact(mlp_map, point, step):
    for name, f, p, u in cases(mlp_map, *point):
        v_fd, t_fd = jvp(f, p, u, strategy="finite_difference", step=step)
        v_ex, t_ex = jvp(f, p, u, strategy="exact")
        torch.testing.assert_close(v_fd, v_ex, atol=1e-14, rtol=0)
        torch.testing.assert_close(t_fd, t_ex, atol=1e-6, rtol=0, msg=name)


def test_unknown_strategy_and_mismatched_tangents(mlp_map, point):
    s, t, x, _ = point
    with pytest.raises(ValueError):
        jvp(lambda tt: mlp_map(s, tt, x), (t,), (torch.ones_like(t),), strategy="nope")
    with pytest.raises(ValueError):
        jvp(lambda tt: mlp_map(s, tt, x), (t,), ())


def test_parameter_gradients_flow_through_exact_tangent(mlp_map, point):
    """grad_theta <w, J u> by reverse-over-forward equals the gradient of <w, central difference>."""
    params = [p for p in mlp_map.parameters()]
    g = torch.Generator().manual_seed(7)
    for name, f, p, u in cases(mlp_map, *point):
        w = torch.randn(B, D, generator=g, dtype=F64)
        _, tangent = jvp(f, p, u, strategy="exact")
        exact = torch.autograd.grad((w * tangent).sum(), params)
        approx = torch.autograd.grad((w * central(f, p, u, 1e-6)).sum(), params)
        assert sum(ge.abs().sum() for ge in exact) > 0  # (the output bias alone gets none)
        for ge, ga in zip(exact, approx):
            torch.testing.assert_close(ge, ga, atol=1e-5, rtol=1e-5, msg=name)
        # and the primal output carries the ordinary gradient
        value, _ = jvp(f, p, u, strategy="exact")
        for ge, ga in zip(torch.autograd.grad((w * value).sum(), params),
                          torch.autograd.grad((w * f(*p)).sum(), params)):
            torch.testing.assert_close(ge, ga, atol=1e-13, rtol=0)


def test_dual_tangent_linear_equals_torch_func_jvp_in_value_tangent_and_gradients(point):
    """flowspec.jvp.Linear's one-product tangent W u against PyTorch's own rule (torch.func.jvp
    through nn.Linear), for the values, the tangents and the reverse-mode gradients through both."""
    from torch import nn

    from flowspec.jvp import Linear

    s, t, x, _ = point
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D + 2, 16, dtype=F64), nn.GELU(), nn.Linear(16, D, dtype=F64))
    dual = nn.Sequential(Linear(D + 2, 16, dtype=F64), nn.GELU(), Linear(16, D, dtype=F64))
    dual.load_state_dict(plain.state_dict())
    f = lambda net: (lambda tt: net(torch.cat([x, s[:, None], tt[:, None]], 1)))  # noqa: E731
    one = torch.ones_like(t)
    X0, dX0 = torch.func.jvp(f(plain), (t,), (one,))
    X1, dX1 = jvp(f(dual), (t,), (one,))
    assert torch.allclose(X0, X1, rtol=0, atol=1e-14) and torch.allclose(dX0, dX1, rtol=0, atol=1e-14)
    (X0.sum() + dX0.pow(2).sum()).backward()
    (X1.sum() + dX1.pow(2).sum()).backward()
    for p, q in zip(plain.parameters(), dual.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12)


def test_dual_tangent_linear_keeps_a_tangent_of_its_weights():
    """A jvp in the parameters (a dual weight) falls back to the full rule: d/de (W + e V) x = V x."""
    import torch.autograd.forward_ad as fwAD

    from flowspec.jvp import linear

    g = torch.Generator().manual_seed(1)
    W, V, x = (torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64),
               torch.randn(5, 4, generator=g, dtype=F64))
    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(linear(x, fwAD.make_dual(W, V)))
    assert torch.allclose(tangent, x @ V.T, rtol=0, atol=1e-14)


def test_dual_tangent_conv2d_equals_torch_func_jvp():
    """flowspec.jvp.conv2d's one-convolution tangent against PyTorch's own rule, with gradients."""
    from flowspec.jvp import conv2d

    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(2, 3, 5, 5, generator=g, dtype=F64), torch.randn(2, 3, 5, 5, generator=g, dtype=F64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    y0, t0 = torch.func.jvp(lambda z: torch.nn.functional.conv2d(z, w, padding=1).tanh(), (x,), (u,))
    y1, t1 = jvp(lambda z: conv2d(z, w, padding=1).tanh(), (x,), (u,))
    assert torch.allclose(y0, y1, rtol=0, atol=1e-14) and torch.allclose(t0, t1, rtol=0, atol=1e-14)
    g0, = torch.autograd.grad(t0.pow(2).sum(), w)
    g1, = torch.autograd.grad(t1.pow(2).sum(), w)
    assert torch.allclose(g0, g1, rtol=0, atol=1e-12)
