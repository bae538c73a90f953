"""Objectives against docs/math.md ("Losses", "Sampling of (s, t)", "Exact oracles").

(a) each loss and its parameter gradients against an independent transcription of the formula in docs/math.md
    (plain autograd, no flowspec.jvp), which pins the stop-gradient semantics;
(b) every residual vanishes at the exact Gaussian flow map, with the model or the oracle as teacher;
(c) every residual is positive, with a non-zero gradient, at a perturbed map;
(d) the (s, t) sampler; (e) the batch-loss normalization on a hand-computed batch, and a residual
    that uses more of the off-diagonal sample than I_s (x0, x1, the interpolant); (f) method names.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowspec.flowmap import FlowMap
from flowspec.interpolants import Linear, Trig
from flowspec.networks.mlp import MLP, MLPOptions
from flowspec.objectives.base import Batch, Objective, OffDiagonal, Teacher, sample_times, squared_norm
from flowspec.objectives.eulerian import Eulerian
from flowspec.objectives.flow_matching import FlowMatching
from flowspec.objectives.fmm import FlowMapMatching
from flowspec.objectives.lagrangian import Lagrangian
from flowspec.objectives.progressive import Progressive
from flowspec.objectives.shortcut import Shortcut
from flowspec.teachers import SelfTeacher
from flowspec.testing import ExactFlowMap, GaussianOracle

F64 = torch.float64


def make_objectives() -> dict[str, Objective]:
    return {
        "lagrangian": Lagrangian(),
        "eulerian-full": Eulerian(Eulerian.Options(stop_gradient="full")),
        "eulerian-none": Eulerian(Eulerian.Options(stop_gradient="none")),
        "progressive-half": Progressive(Progressive.Options(gamma="half")),
        "progressive-uniform": Progressive(Progressive.Options(gamma="uniform")),
    }


# ---------------------------------------------------------------------------------------------
# (a) independent transcription of docs/math.md
# ---------------------------------------------------------------------------------------------
B, D, N_DIAG = 6, 2, 2

HAND_SCHEDULES = {  # alpha, beta, alphadot, betadot
    "linear": (Linear, lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t), lambda t: torch.ones_like(t)),
    "trig": (Trig, lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2),
             lambda t: -math.pi / 2 * torch.sin(math.pi * t / 2), lambda t: math.pi / 2 * torch.cos(math.pi * t / 2)),
}


def hand_interpolate(name, t, x0, x1):
    _, a, b, ad, bd = HAND_SCHEDULES[name]
    return a(t)[:, None] * x0 + b(t)[:, None] * x1, ad(t)[:, None] * x0 + bd(t)[:, None] * x1


class Hand:
    """The formulas of docs/math.md written directly on the network: X_{s,t}(x) = x + (t - s) net(x, s, t)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def v(self, s, t, x):
        return self.net(x, s, t)

    def X(self, s, t, x):
        return x + (t - s)[:, None] * self.net(x, s, t)

    @staticmethod
    def d_dtime(fn, tau):
        """(fn(tau), d fn / d tau) per sample by reverse mode (rows are independent), with graph."""
        tau = tau.detach().requires_grad_(True)
        out = fn(tau)
        cols = [torch.autograd.grad(out[:, k].sum(), tau, create_graph=True)[0] for k in range(out.shape[1])]
        return out, torch.stack(cols, 1)

    @staticmethod
    def jac_vec(fn, x, b, keep_graph):
        """grad_x fn(x) b per sample, by reverse mode on each output component."""
        x = x.detach().requires_grad_(True)
        out = fn(x)
        cols = [(torch.autograd.grad(out[:, k].sum(), x, retain_graph=True, create_graph=keep_graph)[0] * b).sum(1)
                for k in range(out.shape[1])]
        return torch.stack(cols, 1)

    def diagonal(self, t, it, dit):
        return (self.v(t, t, it) - dit).pow(2).sum(1)

    def lagrangian(self, s, t, xs, dxs):
        X, dX_dt = self.d_dtime(lambda tau: self.X(s, tau, xs), t)
        return dX_dt - self.v(t, t, X.detach()).detach()          # r = dX/dt - sg(b_t(sg X))

    def eulerian(self, s, t, xs, dxs, stop_gradient, target="self"):
        b = (self.v(s, s, xs) if target == "self" else dxs).detach()
        _, dX_ds = self.d_dtime(lambda sig: self.X(sig, t, xs), s)
        adv = self.jac_vec(lambda y: self.X(s, t, y), xs, b, keep_graph=stop_gradient == "none")
        return dX_ds + (adv.detach() if stop_gradient == "full" else adv)

    def progressive(self, s, t, xs, dxs, gamma):
        u = gamma * s + (1 - gamma) * t
        with torch.no_grad():
            v_su = self.v(s, u, xs)
            x_u = xs + (u - s)[:, None] * v_su
            target = (1 - gamma)[:, None] * v_su + gamma[:, None] * self.v(u, t, x_u)
        return self.v(s, t, xs) - target


@pytest.fixture
def case_data():
    torch.manual_seed(0)
    fm = FlowMap(MLP(MLPOptions(width=16, depth=2), (D,))).to(F64)
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(B, D, generator=g, dtype=F64), 1.5 + torch.randn(B, D, generator=g, dtype=F64)
    td = torch.rand(N_DIAG, generator=g, dtype=F64)
    pair = torch.rand(B - N_DIAG, 2, generator=g, dtype=F64)
    s = torch.cat([td, pair.min(1).values])
    t = torch.cat([td, pair.max(1).values])
    gamma = torch.rand(B - N_DIAG, generator=g, dtype=F64)
    return fm, Batch(x0, x1), s, t, gamma


def hand_loss(hand, name, batch, s, t, n_diag, residual):
    it, dit = hand_interpolate(name, t[:n_diag], batch.x0[:n_diag], batch.x1[:n_diag])
    total = hand.diagonal(t[:n_diag], it, dit).sum()
    if n_diag < len(s):
        xs, dxs = hand_interpolate(name, s[n_diag:], batch.x0[n_diag:], batch.x1[n_diag:])
        total = total + residual(s[n_diag:], t[n_diag:], xs, dxs).pow(2).sum()
    return total / len(s)


def grads(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)


CASES = ["lagrangian", "eulerian-full", "eulerian-none", "eulerian-conditional",
         "progressive-half", "progressive-uniform", "flow_matching"]


@pytest.mark.parametrize("schedule", ["linear", "trig"])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_match_transcription(case_data, case, schedule, monkeypatch):
    fm, batch, s, t, gamma = case_data
    hand, interp, n_diag = Hand(fm.net), HAND_SCHEDULES[schedule][0](), N_DIAG
    if case == "lagrangian":
        obj, res = Lagrangian(), hand.lagrangian
    elif case.startswith("eulerian"):
        sg = "none" if case == "eulerian-none" else "full"
        target = "conditional" if case == "eulerian-conditional" else "self"
        obj = Eulerian(Eulerian.Options(stop_gradient=sg, target=target))
        res = lambda *a: hand.eulerian(*a, stop_gradient=sg, target=target)  # noqa: E731
    elif case.startswith("progressive"):
        obj = Progressive(Progressive.Options(gamma=case.split("-")[1]))
        g = torch.full_like(gamma, 0.5) if case.endswith("half") else gamma
        if case.endswith("uniform"):
            monkeypatch.setattr(obj, "split", lambda s_, generator=None: gamma)
        res = lambda *a: hand.progressive(*a, gamma=g)  # noqa: E731
    else:
        obj, res, n_diag = FlowMatching(), None, B
        s = t
    out = obj.loss_at(fm, interp, SelfTeacher(fm), batch, s, t, n_diag)
    want = hand_loss(hand, schedule, batch, s, t, n_diag, res)
    torch.testing.assert_close(out.loss, want, atol=1e-10, rtol=0)
    g_obj, g_hand = grads(out.loss, fm), grads(want, fm)
    for a, b in zip(g_obj, g_hand):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert sum(a.abs().sum() for a in g_obj) > 0


def test_transcription_detects_wrong_stop_gradient(case_data):
    """Sanity of (a): removing a stop-gradient changes the gradient well beyond the tolerance."""
    fm, batch, s, t, _ = case_data
    hand = Hand(fm.net)
    ok = Lagrangian().loss_at(fm, Linear(), SelfTeacher(fm), batch, s, t, N_DIAG).loss

    def no_sg(s_, t_, xs, dxs):
        X, dX_dt = hand.d_dtime(lambda tau: hand.X(s_, tau, xs), t_)
        return dX_dt - hand.v(t_, t_, X)

    bad = hand_loss(hand, "linear", batch, s, t, N_DIAG, no_sg)
    diff = max((a - b).abs().max() for a, b in zip(grads(ok, fm), grads(bad, fm)))
    assert diff > 1e-4


# ---------------------------------------------------------------------------------------------
# (b), (c) the exact Gaussian oracle
# ---------------------------------------------------------------------------------------------
MU = torch.tensor([0.8, -0.5], dtype=F64)
ORACLES = [pytest.param((I, c), id=f"{I.__name__}-c{c}") for I in (Linear, Trig) for c in (1.0, 0.7)]


def oracle_batch(oracle, n=64, gap=0.0, seed=0):
    """The batch and its off-diagonal sample: times s < t (t - s >= gap), x0 ~ base, x1 ~ N(mu, sigma^2),
    I_s and dI_s/ds."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = oracle.sample_base(n, g), oracle.sample_data(n, g)
    pair = torch.rand(n, 2, generator=g, dtype=F64)
    s, t = pair.min(1).values, pair.max(1).values
    if gap:
        s = s * (1 - gap)
        t = s + gap + (1 - gap - s) * torch.rand(n, generator=g, dtype=F64)
    return Batch(x0, x1), OffDiagonal.at(oracle.interpolant, s, t, x0, x1)


@pytest.mark.parametrize("spec", ORACLES)
@pytest.mark.parametrize("teacher_kind", ["self", "oracle"])
def test_residuals_vanish_at_exact_map(spec, teacher_kind):
    interp, c = spec
    oracle = GaussianOracle(interp(), MU, sigma=1.3, c=c)
    fm = ExactFlowMap(oracle)
    teacher = SelfTeacher(fm) if teacher_kind == "self" else oracle
    assert isinstance(teacher, Teacher)
    batch, off = oracle_batch(oracle)
    s, t, xs = off.s, off.t, off.xs
    for name, obj in make_objectives().items():
        r = obj.residual(fm, teacher, off)
        assert r.shape == xs.shape
        assert r.abs().max() <= 1e-8, name
        out = obj.loss_at(fm, oracle.interpolant, teacher, batch, s, t, 0)
        assert out.logs["distill"] <= 1e-16 and out.loss <= 1e-16, name
    # the diagonal: v_{t,t} = b_t exactly, so the flow-matching term is the irreducible regression
    torch.testing.assert_close(fm.velocity(t, xs), oracle.velocity(t, xs), atol=1e-13, rtol=0)
    it, dit = oracle.interpolant.interpolate(t, batch.x0, batch.x1)
    out = FlowMatching().loss_at(fm, oracle.interpolant, teacher, batch, t, t, len(t))
    torch.testing.assert_close(out.loss, squared_norm(oracle.velocity(t, it) - dit).mean(), atol=1e-13, rtol=0)
    assert out.loss > 0.01


@pytest.mark.parametrize("spec", ORACLES)
@pytest.mark.parametrize("teacher_kind", ["self", "oracle"])
def test_residuals_positive_at_perturbed_map(spec, teacher_kind, monkeypatch):
    interp, c = spec
    oracle = GaussianOracle(interp(), MU, sigma=1.3, c=c)
    fm = ExactFlowMap(oracle, eps=0.1)
    teacher = SelfTeacher(fm) if teacher_kind == "self" else oracle
    batch, off = oracle_batch(oracle, n=32, gap=0.2, seed=1)
    s, t, xs = off.s, off.t, off.xs
    objectives = make_objectives()
    # PSD's residual scales like gamma (1 - gamma): keep gamma away from 0 and 1 for a per-sample bound
    gamma = 0.1 + 0.8 * torch.rand(len(s), generator=torch.Generator().manual_seed(2), dtype=F64)
    monkeypatch.setattr(objectives["progressive-uniform"], "split", lambda s_, generator=None: gamma)
    for name, obj in objectives.items():
        per = squared_norm(obj.residual(fm, teacher, off))
        # per sample |r|^2 >= 1e-9 (at the exact map <= 1e-16); a few 1e-4 on average
        assert per.min() > 1e-9 and per.mean() > 1e-5, name
        fm.zero_grad()
        obj.loss_at(fm, oracle.interpolant, teacher, batch, s, t, 0).loss.backward()
        assert fm.weight.grad.abs() > 1e-4, name
    # flow matching sees only the diagonal: unchanged by eps, broken by diagonal_eps
    torch.testing.assert_close(fm.velocity(t, xs), oracle.velocity(t, xs), atol=1e-13, rtol=0)
    bad = ExactFlowMap(oracle, diagonal_eps=0.1)
    assert (bad.velocity(t, xs) - oracle.velocity(t, xs)).abs().min() > 0
    FlowMatching().loss_at(bad, oracle.interpolant, teacher, batch, t, t, len(t)).loss.backward()
    assert bad.weight.grad.abs() > 1e-4


# ---------------------------------------------------------------------------------------------
# (d) sampling of (s, t)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta, n", [(0.75, 6), (0.75, 100), (0.3, 7), (0.0, 5), (1.0, 5)])
def test_sample_times_split(eta, n):
    obj = Lagrangian(Lagrangian.Options(diagonal_fraction=eta))
    s, t, n_diag = obj.sample_times(n, "cpu", F64)
    assert s.shape == t.shape == (n,) and s.dtype == F64
    assert abs(n_diag - eta * n) <= 0.5  # round(eta B); either way at a tie (0.75 * 6 = 4.5)
    assert torch.equal(s[:n_diag], t[:n_diag])
    assert (s[n_diag:] < t[n_diag:]).all()
    assert ((s >= 0) & (t <= 1)).all()


def test_sample_times_distribution():
    torch.manual_seed(0)
    obj = Lagrangian(Lagrangian.Options(diagonal_fraction=0.25))
    s, t, n_diag = obj.sample_times(100_000, "cpu", F64)
    so, to, td = s[n_diag:], t[n_diag:], t[:n_diag]
    # uniform on the triangle s < t (density 2): E s = 1/3, E t = 2/3, E st = 1/4, P(t < 1/2) = 1/4
    assert abs(so.mean() - 1 / 3) < 0.01 and abs(to.mean() - 2 / 3) < 0.01
    assert abs((so * to).mean() - 1 / 4) < 0.01
    assert abs((to < 0.5).double().mean() - 0.25) < 0.01
    assert abs((so > 0.5).double().mean() - 0.25) < 0.01
    # diagonal t ~ U[0, 1]
    assert abs(td.mean() - 0.5) < 0.01 and abs((td < 0.25).double().mean() - 0.25) < 0.01


def test_sample_times_draw_order():
    """The diagonal times first, then the off-diagonal pairs (two uniforms each, sorted), all from
    the generator: the draws every run and every test's numbers depend on."""
    s, t, n_diag = sample_times(6, 1 / 3, "cpu", F64, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    td, pair = torch.rand(2, generator=g, dtype=F64), torch.rand(4, 2, generator=g, dtype=F64)
    assert n_diag == 2
    assert torch.equal(s, torch.cat([td, pair.min(1).values])) and torch.equal(t, torch.cat([td, pair.max(1).values]))
    obj = Lagrangian(Lagrangian.Options(diagonal_fraction=1 / 3))
    same = obj.sample_times(6, "cpu", F64, torch.Generator().manual_seed(5))
    assert torch.equal(same[0], s) and torch.equal(same[1], t) and same[2] == 2


def test_progressive_uniform_split():
    torch.manual_seed(0)
    gamma = Progressive(Progressive.Options(gamma="uniform")).split(torch.zeros(50_000, dtype=F64))
    assert gamma.shape == (50_000,) and ((gamma >= 0) & (gamma <= 1)).all()
    assert abs(gamma.mean() - 0.5) < 0.01 and abs(gamma.var() - 1 / 12) < 0.005
    half = Progressive(Progressive.Options(gamma="half")).split(torch.zeros(3, dtype=F64))
    assert torch.equal(half, torch.full((3,), 0.5, dtype=F64))
    # the batch's generator reaches the split through the residual's sample
    drawn = Progressive().split(torch.zeros(4, dtype=F64), torch.Generator().manual_seed(9))
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(9), dtype=F64))


# ---------------------------------------------------------------------------------------------
# (e) batch loss = (sum of diagonal terms + sum of off-diagonal terms) / B, by hand
# ---------------------------------------------------------------------------------------------
class ZeroNet(nn.Module):
    def forward(self, x, s, t):
        return torch.zeros_like(x)


class EchoObjective(Objective):
    """r = I_s itself; records the off-diagonal sample it was given."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        self.seen = sample
        return sample.xs


def test_batch_loss_normalization_by_hand():
    x0 = torch.tensor([[1, 0], [0, 2], [1, 1], [2, 0], [0, 0]], dtype=F64)
    x1 = torch.tensor([[2, 1], [1, 1], [3, 1], [0, 0], [1, -1]], dtype=F64)
    s = torch.tensor([0.5, 0.25, 0.5, 0.25, 0.0], dtype=F64)
    t = torch.tensor([0.5, 0.25, 0.75, 1.0, 0.5], dtype=F64)
    fm, obj = FlowMap(ZeroNet()), EchoObjective()
    out = obj.loss_at(fm, Linear(), SelfTeacher(fm), Batch(x0, x1), s, t, 2)
    # diagonal (v = 0): |x1 - x0|^2 = |(1, 1)|^2 + |(1, -1)|^2 = 2 + 2
    # off-diagonal, |I_s|^2 with I_s = (1 - s) x0 + s x1: |(2, 1)|^2 + |(1.5, 0)|^2 + |(0, 0)|^2 = 5 + 2.25 + 0
    assert out.loss.item() == (4 + 7.25) / 5
    assert out.logs["diagonal"].item() == 2.0 and out.logs["distill"].item() == 7.25 / 3
    assert out.logs["loss"].item() == out.loss.item()
    seen = obj.seen
    assert torch.equal(seen.s, s[2:]) and torch.equal(seen.t, t[2:])
    assert torch.equal(seen.x0, x0[2:]) and torch.equal(seen.x1, x1[2:])
    assert torch.equal(seen.xs, torch.tensor([[2, 1], [1.5, 0], [0, 0]], dtype=F64))
    assert torch.equal(seen.dxs, x1[2:] - x0[2:])
    assert seen.generator is None and isinstance(seen.interpolant, Linear)


class EndpointObjective(Objective):
    """A residual that needs more than I_s: r = x1 - I_t, the data sample against the interpolant
    at the later time t (computed from x0, x1 and the interpolant itself); records its sample."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        self.seen = sample
        it, _ = sample.interpolant.interpolate(sample.t, sample.x0, sample.x1)
        return sample.x1 - it


def test_a_residual_sees_x0_x1_the_interpolant_and_the_generator():
    x0 = torch.tensor([[1, 0], [0, 2], [1, 1], [2, 0], [0, 0]], dtype=F64)
    x1 = torch.tensor([[2, 1], [1, 1], [3, 1], [0, 0], [1, -1]], dtype=F64)
    s = torch.tensor([0.5, 0.25, 0.5, 0.25, 0.0], dtype=F64)
    t = torch.tensor([0.5, 0.25, 0.75, 1.0, 0.5], dtype=F64)
    fm, obj, interp, g = FlowMap(ZeroNet()), EndpointObjective(), Linear(), torch.Generator().manual_seed(0)
    out = obj.loss_at(fm, interp, SelfTeacher(fm), Batch(x0, x1, g), s, t, 2)
    # diagonal (v = 0): |x1 - x0|^2 = 2 + 2. Off-diagonal, linear: x1 - I_t = (1 - t)(x1 - x0) =
    # 0.25 (2, 0), 0 (-2, 0), 0.5 (1, -1) = (0.5, 0), (0, 0), (0.5, -0.5): |r|^2 = 0.25 + 0 + 0.5
    assert out.loss.item() == (4 + 0.75) / 5
    assert out.logs["distill"].item() == 0.75 / 3
    seen = obj.seen
    assert seen.interpolant is interp and seen.generator is g
    assert torch.equal(seen.x0, x0[2:]) and torch.equal(seen.x1, x1[2:])
    with pytest.raises(AttributeError):  # frozen: a residual cannot change what the loss sees
        seen.xs = seen.x1


def test_call_samples_times_then_loss_at(case_data):
    fm, batch, _, _, _ = case_data
    obj = Lagrangian()
    torch.manual_seed(3)
    s, t, n_diag = obj.sample_times(B, "cpu", F64)
    want = obj.loss_at(fm, Linear(), SelfTeacher(fm), batch, s, t, n_diag).loss
    torch.manual_seed(3)
    assert torch.equal(obj(fm, Linear(), SelfTeacher(fm), batch).loss, want)


@pytest.mark.parametrize("cls, extra", [(Lagrangian, {}), (Eulerian, {"stop_gradient": "full"}),
                                        (Eulerian, {"stop_gradient": "none"})])
def test_finite_difference_jvp_option(case_data, cls, extra):
    fm, batch, s, t, _ = case_data
    losses = [cls(cls.Options(jvp=j, **extra)).loss_at(fm, Linear(), SelfTeacher(fm), batch, s, t, N_DIAG).loss
              for j in ("exact", "finite_difference")]
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# (f) method names: each objective's own class attributes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective, name", [
    (Lagrangian(), "LSD"), (Lagrangian(Lagrangian.Options(target="teacher")), "LMD"),
    (Eulerian(), "ESD"), (Eulerian(Eulerian.Options(target="teacher")), "EMD"),
    (Eulerian(Eulerian.Options(target="conditional")), "MeanFlow (Eulerian consistency training)"),
    (Progressive(), "PSD-U"), (Progressive(Progressive.Options(gamma="half")), "PSD-M"),
    (Progressive(Progressive.Options(target="teacher", gamma="half")), "PD"),
    (Shortcut(), "shortcut model"), (Shortcut(Shortcut.Options(target="teacher")), "shortcut (teacher)"),
    (FlowMapMatching(), "flow map matching"), (FlowMatching(), "flow matching"),
    (type("Custom", (Objective,), {"characterization": "custom"})(), "custom (self)"),  # no names: the fallback
])
def test_method_names_are_class_attributes(objective, name):
    assert objective.method_name() == name
