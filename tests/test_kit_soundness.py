"""check_objective tells objectives that train from objectives that only look right (issue 14).

Four unsound objectives a researcher could write from docs/plugins.md, each rejected with a message
naming what is wrong; sound ones, including a very robust penalty and the finite-difference jvp,
accepted. Each check runs in seconds.
"""

from __future__ import annotations

import time

import pytest
import torch

from flowspec.flowmap import FlowMap
from flowspec.interpolants import Linear, Trig
from flowspec.jvp import jvp
from flowspec.objectives.base import OffDiagonal, Teacher, squared_norm
from flowspec.objectives.eulerian import Eulerian
from flowspec.objectives.lagrangian import Lagrangian
from flowspec.testing import CheckFailed, check_objective, check_penalty, correlated_gaussian, default_oracles
from flowspec.testing.common import zero_tolerance

F32, F64 = torch.float32, torch.float64
CORRELATED = [correlated_gaussian(Linear(), 3, 1), correlated_gaussian(Trig(), 3, 2)]


class WrongSideLagrangian(Lagrangian):
    """Unsound: the stop-gradient on the wrong side, r = sg(dX/dt) - b_t(X), gradient through X."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),))
        return dX_dt.detach() - flow_map.velocity(t, X)


class VJPEulerian(Eulerian):
    """Unsound: the advective term as a vector-Jacobian product b^T grad X instead of grad X b."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        b = self.target_velocity(teacher, s, x, sample.dxs)
        _, dX_ds = jvp(lambda ss: flow_map(ss, t, x), (s,), (torch.ones_like(s),))
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (advection,) = torch.autograd.grad(flow_map(s, t, xx), xx, grad_outputs=b)
        return dX_ds + advection.detach()


class FirstCoordinate(Lagrangian):
    """Unsound: a penalty on the first coordinate of the residual only."""

    def penalty(self, r):
        return r[:, 0].pow(2)


class SquareOfSum(Lagrangian):
    """Unsound: (sum_i r_i)^2 instead of sum_i r_i^2."""

    def penalty(self, r):
        return r.flatten(1).sum(1).pow(2)


class VeryRobust(Lagrangian):
    """Sound: pseudo-Huber with c = 1000, sqrt(|r|^2 + c^2) - c ~ |r|^2 / 2000: tiny gradients."""

    def penalty(self, r):
        sq = squared_norm(r)
        return sq / (torch.sqrt(sq + 1e6) + 1e3)


def timed_check(objective, **kwargs):
    start = time.perf_counter()
    try:
        return check_objective(objective, **kwargs), None, time.perf_counter() - start
    except CheckFailed as exc:
        return None, str(exc), time.perf_counter() - start


def test_wrong_side_stop_gradient_is_rejected_as_repelling():
    _, msg, seconds = timed_check(WrongSideLagrangian, targets=["self"], oracles=CORRELATED)
    assert msg is not None and seconds < 60
    assert "training does not pull the map back to the exact map" in msg
    assert "gradient descent does not approach the exact map" not in msg  # only run once the rest passes
    # it is stationary at the exact map: no residual or gradient complaint there
    assert "not zero at the exact flow map" not in msg


def test_vjp_in_the_eulerian_residual_is_rejected():
    _, msg, seconds = timed_check(VJPEulerian, targets=["self", "teacher"], oracles=CORRELATED, dtypes=[F64])
    assert msg is not None and seconds < 60
    lines = msg.splitlines()
    residual = [m for m in lines if "off-diagonal residual is not zero at the exact flow map" in m]
    gradient = [m for m in lines if "the exact flow map is not a minimizer" in m]
    assert len(residual) == len(gradient) == 2 * 2 and len(lines) == 8  # 2 targets x 2 oracles
    # a symmetric Jacobian (isotropic base and target) would have hidden it: grad X = grad X^T there
    check_objective(VJPEulerian, targets=["self"], oracles=default_oracles()[:1], dtypes=[F64])


@pytest.mark.parametrize("cls, probe", [(FirstCoordinate, "r = [0.0, 0.001, 0.0]"),
                                        (SquareOfSum, "r = [1.0, -1.0, 0.0]")])
def test_partial_penalties_are_rejected(cls, probe):
    _, msg, seconds = timed_check(cls, targets=["self"], oracles=CORRELATED[:1], dtypes=[F64])
    assert msg is not None and seconds < 60
    assert f"{cls.__name__}: penalty vanishes at" in msg and probe in msg
    assert "must depend on the whole residual and vanish only at r = 0" in msg
    with pytest.raises(CheckFailed, match="penalty vanishes at"):
        check_penalty(cls())


def test_the_descent_run_converges_for_sound_objectives_only():
    """The convergence line reports the map error after 100 Adam steps; the partial penalties leave
    most of it (their penalty check fails first, so run the descent directly)."""
    from flowspec.testing.objective_checks import _Case, _converges

    sound, _ = _converges(_Case(Lagrangian(), "self", CORRELATED[0], F64, 256, 0))
    assert sound is None
    partial, summary = _converges(_Case(FirstCoordinate(), "self", CORRELATED[0], F64, 256, 0))
    assert partial is not None and "does not approach the exact map" in partial
    assert float(summary.rsplit("x ", 1)[1]) > 0.25


def test_a_very_robust_penalty_is_accepted():
    checked, msg, seconds = timed_check(VeryRobust)
    assert msg is None, msg
    assert seconds < 60 and any("penalty zero at r = 0 only" in line for line in checked)


@pytest.mark.parametrize("cls, options", [(Lagrangian, {}), (Eulerian, {"stop_gradient": "full"}),
                                          (Eulerian, {"stop_gradient": "none", "target": "self"})])
def test_finite_difference_jvp_is_accepted_in_both_dtypes(cls, options):
    obj = cls(cls.Options(jvp="finite_difference", **options))
    targets = ["self", "teacher"]
    checked, msg, seconds = timed_check(obj, targets=targets)
    assert msg is None, msg
    assert seconds < 60 and len(checked) == len(targets) * 4 * 2 + len(targets) + 1


def test_tolerances_by_dtype_and_strategy():
    assert zero_tolerance(F64) == 1e-8 and zero_tolerance(F32) == 1e-4
    # central differences at h = eps^(1/3) / 1000: 4 eps / h
    assert zero_tolerance(F64, "finite_difference") == pytest.approx(4 * 2.220446e-16 / (6.055454e-06 / 1000), rel=1e-5)
    assert zero_tolerance(F32, "finite_difference") == pytest.approx(0.0973, rel=1e-2)


class AbsolutePenalty(Lagrangian):
    """Sound, not differentiable at 0: sum_i |r_i| (its gradient at the exact map is sign(rounding))."""

    def penalty(self, r):
        return r.abs().flatten(1).sum(1)


class NormPenalty(Lagrangian):
    """Unsound in practice: |r| = sqrt(|r|^2) has an infinite gradient at r = 0 (NaN in training)."""

    def penalty(self, r):
        return squared_norm(r).sqrt()


def test_a_penalty_not_differentiable_at_zero_is_judged_on_its_residual():
    checked, msg, _ = timed_check(AbsolutePenalty, targets=["self"], dtypes=[F64])
    assert msg is None, msg
    _, msg, _ = timed_check(NormPenalty, targets=["self"], dtypes=[F64])
    assert msg is not None and "loss, residual or gradient not finite" in msg


def test_meanflow_with_its_adaptive_weight_is_accepted():
    """The shipped MeanFlow spec's objective: the weight sg(1 / (|r|^2 + 1e-3)) depends on the noise of
    dI_s/ds, so the antithetic average is not exact; the descent check then uses 2048 pairs."""
    obj = Eulerian(Eulerian.Options(target="conditional", adaptive_weight=1.0, adaptive_eps=1e-3))
    checked, msg, seconds = timed_check(obj, targets=["conditional"])
    assert msg is None, msg
    assert seconds < 60 and len(checked) == 4 * 2 + 1 + 1


def test_a_teacher_integrated_with_fixed_steps_is_named_when_it_is_not_accurate_enough():
    from flowspec.objectives.progressive import Progressive

    obj = Progressive(Progressive.Options(target="teacher", teacher_solver="rk4", teacher_steps=4))
    _, msg, _ = timed_check(obj, targets=["teacher"], dtypes=[F64])
    assert msg is not None and "the teacher's map is rk4 with fixed steps, whose error counts here" in msg
    check_objective(Progressive(Progressive.Options(target="teacher")), targets=["teacher"], dtypes=[F64])
