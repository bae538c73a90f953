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


# -- randomness: one dropout mask for every evaluation of f (issue 18) ------------------------------

P_DROP = 0.3


def dropout_mlp(width: int = 16):
    """Linear -> tanh -> Dropout(0.3) -> Linear, float64, in train mode (dropout active)."""
    from torch import nn

    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(D, width, dtype=F64), nn.Tanh(), nn.Dropout(P_DROP),
                         nn.Linear(width, D, dtype=F64)).train()


def test_finite_difference_with_dropout_is_the_derivative_at_one_fixed_mask(point):
    """Oracle: the analytic derivative of W2 (m * tanh(W1 x + b1)) / (1 - p) + b2 for the mask m the
    jvp's first draw takes. The mask is read off nn.Dropout itself, seeded alike, and the value check
    (1e-14) confirms that f(p) used exactly that mask, so the oracle cannot be fooled by a wrong one.
    Before the fix each evaluation drew its own mask and the quotient was of order |f| / h ~ 1e8."""
    _, _, x, b = point
    net = dropout_mlp()
    lin1, drop, lin2 = net[0], net[2], net[3]
    pre = lin1(x)
    torch.manual_seed(11)
    mask = drop(torch.ones_like(pre)) != 0
    assert 0 < mask.sum() < mask.numel()  # some units dropped, some kept: a mask that can differ
    keep = mask.to(F64) / (1 - P_DROP)
    want_value = lin2(keep * pre.tanh())
    want_tangent = (keep * (1 - pre.tanh() ** 2) * (b @ lin1.weight.T)) @ lin2.weight.T
    for step in (None, 1e-5):
        torch.manual_seed(11)
        value, tangent = jvp(net, (x,), (b,), strategy="finite_difference", step=step)
        torch.testing.assert_close(value, want_value, atol=1e-14, rtol=0)
        # error = h^2/6 |f'''| (f''' ~ 1: tanh and O(1) weights) + rounding ~ 1e-16 |f| / h:
        # about 2e-8 at the default h = 6e-9, and 2e-11 + 1e-11 at h = 1e-5 (measured 7.7e-9, 1.4e-11)
        atol = 1e-7 if step is None else 1e-9
        torch.testing.assert_close(tangent, want_tangent, atol=atol, rtol=0, msg=f"step {step}")


def test_finite_difference_leaves_the_generator_where_one_forward_pass_does(point):
    """After the jvp the default generator is where f(p) alone leaves it, so what the caller draws
    next (the next batch, the next mask) is what it would draw after an exact jvp."""
    _, _, x, b = point
    net = dropout_mlp()
    torch.manual_seed(3)
    net(x)
    after_forward = torch.get_rng_state()
    torch.manual_seed(3)
    jvp(net, (x,), (b,), strategy="exact")
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.manual_seed(3)
    jvp(net, (x,), (b,), strategy="finite_difference")
    assert torch.equal(torch.get_rng_state(), after_forward)
    # and with no randomness in f the state is left alone
    net.eval()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    jvp(net, (x,), (b,), strategy="finite_difference")
    assert torch.equal(torch.get_rng_state(), before)


def test_finite_difference_matches_exact_on_a_unet_with_dropout():
    """flowspec's U-Net with dropout 0.3 in train mode, the jvp in t through the flow map: the exact
    strategy (one evaluation, one mask) and finite differences from the same seed see the same mask
    (the values agree to rounding), so their tangents agree to the difference quotient's error."""
    from flowspec.flowmap import FlowMap
    from flowspec.networks.unet import UNet

    torch.manual_seed(0)
    net = UNet(UNet.Options(channels=8, channel_mult=[1, 2], num_blocks=1, attention_resolutions=[],
                            embedding_dim=8, dropout=P_DROP), (1, 8, 8)).to(F64).train()
    with torch.no_grad():  # the zero-initialized gains would make v = 0 and the test vacuous
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if hasattr(m, "emb_gain"):
                m.emb_gain.fill_(0.5)
    fm = FlowMap(net, scale=0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    s = torch.tensor([0.0, 0.2, 0.5], dtype=F64)
    t = torch.tensor([0.9, 0.7, 0.6], dtype=F64)
    f = lambda tt: fm(s, tt, x)  # noqa: E731
    one = torch.ones_like(t)
    torch.manual_seed(4)
    v_ex, t_ex = jvp(f, (t,), (one,), strategy="exact")
    torch.manual_seed(4)
    v_fd, t_fd = jvp(f, (t,), (one,), strategy="finite_difference")
    torch.manual_seed(5)
    other = f(t)  # another mask: the test can tell one mask from two
    assert (other - v_ex).abs().max() > 1e-3
    torch.testing.assert_close(v_fd, v_ex, atol=1e-12, rtol=0)
    assert t_ex.abs().max() > 0.1  # a derivative worth comparing
    # h = 6e-9 (edm2 embeddings: frequencies <= 1, truncation h^2 |X'''| ~ 1e-17): the error is the
    # rounding of the network's sums, a few eps |X| / h ~ 1e-7 (measured 1.9e-7, |dX/dt| up to 3.8)
    torch.testing.assert_close(t_fd, t_ex, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_finite_difference_through_output_dropout_on_each_device(device):
    """f(x) = dropout(tanh(x)): the mask is read off the returned value itself (v != 0), so the
    oracle m (1 - tanh^2 x) u / (1 - p) holds whatever way the device draws its masks; the
    device's generator (CUDA's own, not only the CPU's) ends where one forward pass leaves it."""
    g = torch.Generator().manual_seed(2)
    x, u = (torch.randn(64, 8, generator=g, dtype=F64).to(device) for _ in range(2))
    f = lambda z: torch.nn.functional.dropout(z.tanh(), P_DROP, training=True)  # noqa: E731
    state = (lambda: torch.cuda.get_rng_state(x.device)) if device == "cuda" else torch.get_rng_state
    torch.manual_seed(8)
    f(x)
    after_forward = state()
    torch.manual_seed(8)
    value, tangent = jvp(f, (x,), (u,), strategy="finite_difference", step=1e-5)
    assert torch.equal(state(), after_forward)
    keep = (value != 0).to(F64) / (1 - P_DROP)
    assert 0.5 < keep.count_nonzero() / keep.numel() < 0.9  # about 70% kept: a real mask
    torch.testing.assert_close(value, keep * x.tanh(), atol=1e-15, rtol=0)
    # h = 1e-5: truncation h^2/6 max|tanh'''| |u|^3 / (1 - p) = 1e-10/6 * 2 * 4^3 / 0.7 = 3e-9 for
    # |u| <= 4 (measured 1.3e-9), rounding eps / h ~ 1e-11
    torch.testing.assert_close(tangent, keep * (1 - x.tanh() ** 2) * u, atol=1e-8, rtol=0)
