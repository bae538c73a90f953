"""MeanFlow adaptive weighting, shortcut models and flow map matching against the Gaussian oracle."""

from __future__ import annotations

import math

import torch

from flowspec import engine
from flowspec.interpolants import Linear, Trig
from flowspec.objectives.base import Batch, OffDiagonal, adaptive
from flowspec.objectives.eulerian import Eulerian
from flowspec.objectives.fmm import FlowMapMatching
from flowspec.objectives.shortcut import Shortcut
from flowspec.teachers import SelfTeacher
from flowspec.testing import ExactFlowMap, GaussianOracle

F64 = torch.float64


def batch(oracle, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(x0=oracle.sample_base(n, g), x1=oracle.sample_data(n, g), generator=g)


def test_adaptive_weight_value_and_gradient():
    per = torch.tensor([0.0, 1.0, 4.0], dtype=F64, requires_grad=True)
    out = adaptive(per, 1.0, 1e-3)
    torch.testing.assert_close(out.detach(), per.detach() / (per.detach() + 1e-3))
    out.sum().backward()
    torch.testing.assert_close(per.grad, 1 / (per.detach() + 1e-3))  # the weight is stop-gradient
    assert adaptive(per, 0.0, 1e-3) is per


def test_meanflow_loss_uses_the_adaptive_weight():
    oracle = GaussianOracle(Linear(), torch.tensor([1.0, -1.0]), 0.5, c=1.0)
    fm = ExactFlowMap(oracle, eps=0.4)
    b = batch(oracle, 64, 0)
    plain = Eulerian(Eulerian.Options(target="conditional"))
    weighted = Eulerian(Eulerian.Options(target="conditional", adaptive_weight=1.0, adaptive_eps=1e-3))
    s = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = s + (1 - s) * 0.5
    lp = plain.loss_at(fm, Linear(), SelfTeacher(fm), b, s, t, 16)
    lw = weighted.loss_at(fm, Linear(), SelfTeacher(fm), b, s, t, 16)
    assert lw.loss < 1.0 < lp.loss  # each weighted term is |r|^2 / (|r|^2 + c) < 1
    torch.testing.assert_close(lw.logs["distill"], lp.logs["distill"])  # logs stay unweighted


def test_shortcut_times_are_dyadic_and_ordered():
    obj = Shortcut(Shortcut.Options(levels=4))
    s, t, n_diag = obj.sample_times(4000, "cpu", F64, torch.Generator().manual_seed(2))
    assert n_diag == 3000 and torch.equal(s[:n_diag], t[:n_diag])
    h = t[n_diag:] - s[n_diag:]
    k = -torch.log2(h)
    assert torch.allclose(k, k.round()) and set(k.round().long().tolist()) == {0, 1, 2, 3}
    assert torch.allclose(s[n_diag:] / h, (s[n_diag:] / h).round())  # s on the grid of its step
    assert (t <= 1).all() and (s >= 0).all()


def test_shortcut_is_zero_at_the_exact_map_and_positive_off_it():
    oracle = GaussianOracle(Trig(), torch.tensor([0.5, 2.0]), 0.7, c=1.3)
    obj = Shortcut(Shortcut.Options(anchor=False))
    b = batch(oracle, 256, 3)
    exact = ExactFlowMap(oracle)
    assert obj(exact, Trig(), SelfTeacher(exact), b).logs["distill"] < 1e-20
    bad = ExactFlowMap(oracle, eps=0.5)
    assert obj(bad, Trig(), SelfTeacher(bad), batch(oracle, 256, 3)).logs["distill"] > 1e-4


def test_anchored_shortcut_finest_target_is_two_euler_steps_of_the_diagonal():
    oracle = GaussianOracle(Trig(), torch.tensor([0.5, 2.0]), 0.7, c=1.3)
    obj = Shortcut(Shortcut.Options(levels=3))  # finest h = 1/4
    exact = ExactFlowMap(oracle)
    s = torch.tensor([0.0, 0.25, 0.5, 0.0], dtype=F64)
    t = torch.tensor([0.25, 0.5, 1.0, 1.0], dtype=F64)
    g = torch.Generator().manual_seed(0)
    off = OffDiagonal.at(Trig(), s, t, oracle.sample_base(4, g), oracle.sample_data(4, g))
    x = off.xs
    r = obj.residual(exact, SelfTeacher(exact), off)
    u, b = (s + t) / 2, oracle.velocity
    x_u = x + (u - s)[:, None] * b(s, x)
    euler = (b(s, x) + b(u, x_u)) / 2
    torch.testing.assert_close(r[:2], exact.v(s, t, x)[:2] - euler[:2])  # finest: the Euler bias
    assert r[:2].abs().max() > 1e-4
    assert r[2:].abs().max() < 1e-10  # coarser levels: exact


def test_fmm_inverse_term_vanishes_and_exact_map_beats_a_perturbed_one():
    oracle = GaussianOracle(Linear(), torch.tensor([1.0, 2.0]), 0.5, c=1.0)
    obj = FlowMapMatching(FlowMapMatching.Options(diagonal_fraction=0.0))
    s, t, _ = obj.sample_times(2000, "cpu", F64, torch.Generator().manual_seed(4))
    assert (s > t).any() and (s < t).any()  # both directions
    b = batch(oracle, 2000, 5)
    exact, bad = ExactFlowMap(oracle), ExactFlowMap(oracle, eps=0.5)
    off = OffDiagonal.at(Linear(), s, t, b.x0, b.x1)
    xs, dxs = off.xs, off.dxs
    r = obj.residual(exact, None, off)
    assert r[:, 1].abs().max() < 1e-10  # X_{t,s}(X_{s,t}(x)) = x
    # the first term is b_s(I_s) - dI_s/ds: its mean vanishes and its variance is the irreducible part
    torch.testing.assert_close(r[:, 0], oracle.velocity(s, xs) - dxs)
    l_exact = obj.loss_at(exact, Linear(), None, b, s, t, 0).loss
    l_bad = obj.loss_at(bad, Linear(), None, b, s, t, 0).loss
    assert l_exact < l_bad
    # gradient flows through both maps
    bad.weight.grad = None
    obj.loss_at(bad, Linear(), None, b, s, t, 0).loss.backward()
    assert bad.weight.grad is not None and bad.weight.grad.abs() > 0


def test_fmm_and_shortcut_train_through_the_spec(tiny_spec):
    from flowspec.compile import compile_spec
    from flowspec.spec import load_spec

    for extra in (["objective.characterization=fmm"],
                  ["objective.characterization=shortcut", "objective.ema_target=true"]):
        g = compile_spec(load_spec(tiny_spec(), extra))
        assert torch.isfinite(engine.step(g).loss)


def test_learned_log_variance_weight(tiny_spec):
    """w = 0 at init (loss unchanged), trained jointly, minimized at w = log |r|^2, checkpointed."""
    from flowspec.compile import compile_spec
    from flowspec.spec import load_spec
    from flowspec.weighting import LogVarianceWeight

    w = LogVarianceWeight()
    s, t = torch.rand(8), torch.rand(8)
    assert torch.equal(w(s, t), torch.zeros(8))
    g = compile_spec(load_spec(tiny_spec(), ["objective.learned_weight=true"]))
    plain = type(g.objective)(g.objective.options.model_copy(update={"learned_weight": False}))
    b = engine.draw_batch(g, 64)
    losses = [obj(g.model, g.interpolant, g.teacher, Batch(b.x0, b.x1, torch.Generator().manual_seed(3))).loss
              for obj in (g.objective, plain)]
    torch.testing.assert_close(losses[0], losses[1])
    engine.step(g)
    assert any(k.startswith("log_weight.") for k in g.model.state_dict())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.model.log_weight.parameters())
    # the optimal weight for a constant residual is log |r|^2
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    per = torch.full((256,), 4.0)
    for _ in range(300):
        opt.zero_grad()
        ww = w(torch.rand(256), torch.rand(256))
        (torch.exp(-ww) * per + ww).mean().backward()
        opt.step()
    assert abs(float(w(torch.rand(16), torch.rand(16)).detach().mean()) - math.log(4.0)) < 0.05
