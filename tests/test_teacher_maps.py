"""The teacher's map for progressive distillation and shortcut models with a teacher (issue 14): its
ODE integrated per sample, so that the exact flow map is the minimizer at every (s, t)."""

from __future__ import annotations

import pytest
import torch

from flowspec.interpolants import Linear, Trig
from flowspec.objectives.base import OffDiagonal
from flowspec.testing import ExactFlowMap, GaussianOracle

F64 = torch.float64
INTERPOLANTS = {"linear": Linear(), "trig": Trig()}


def _grid_pairs(points: int = 11, repeat: int = 4):
    """Every pair s <= t of an 11-point grid (the diagonal, (0, 1) and t - s = 0.1 among them)."""
    g = torch.linspace(0, 1, points, dtype=F64)
    i, j = torch.triu_indices(points, points)
    return g[i].repeat(repeat), g[j].repeat(repeat)


@pytest.mark.parametrize("interp", ["linear", "trig"])
def test_map_velocity_is_the_exact_gaussian_map(interp):
    from flowspec.ode import TeacherMapOptions, map_velocity

    oracle = GaussianOracle(INTERPOLANTS[interp], torch.tensor([0.8, -0.5, 0.3], dtype=F64), 2.0, c=0.5)
    s, t = _grid_pairs()
    x = 1.5 * torch.randn(len(s), 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    v, nfe = map_velocity(oracle.velocity, s, t, x)
    assert (v - oracle.v(s, t, x)).abs().max() < 1e-6 and 0 < nfe < 200
    diag = s == t
    torch.testing.assert_close(v[diag], oracle.velocity(s[diag], x[diag]), atol=1e-12, rtol=0)
    v4, nfe4 = map_velocity(oracle.velocity, s, t, x, TeacherMapOptions(solver="rk4", steps=32))
    assert nfe4 == 4 * 32 and (v4 - oracle.v(s, t, x)).abs().max() < 1e-3


@pytest.mark.parametrize("interp", ["linear", "trig"])
@pytest.mark.parametrize("sigma,c", [(1.3, 1.0), (2.0, 0.5), (0.6, 0.7)])
@pytest.mark.parametrize("objective", ["pd-uniform", "pd-half", "shortcut"])
def test_teacher_distillation_vanishes_at_the_exact_map(interp, sigma, c, objective):
    """PD and shortcut-with-teacher: residual < 1e-6 at the exact Gaussian map at every (s, t) of the
    grid (it was 0.009 to 0.95 with one Euler step of the teacher per stage)."""
    from flowspec.objectives.progressive import Progressive
    from flowspec.objectives.shortcut import Shortcut
    from flowspec.teachers import VelocityTeacher

    oracle = GaussianOracle(INTERPOLANTS[interp], torch.tensor([0.8, -0.5, 0.3], dtype=F64), sigma, c=c)
    obj = (Shortcut(Shortcut.Options(target="teacher")) if objective == "shortcut" else
           Progressive(Progressive.Options(target="teacher", gamma=objective.split("-")[1])))
    s, t = _grid_pairs()
    g = torch.Generator().manual_seed(0)
    off = OffDiagonal.at(oracle.interpolant, s, t, oracle.sample_base(len(s), g), oracle.sample_data(len(s), g),
                         generator=torch.Generator().manual_seed(1))
    r = obj.residual(ExactFlowMap(oracle), VelocityTeacher(oracle.velocity), off)
    assert r.abs().max() < 1e-6
    assert obj.teacher_nfe > 2  # the teacher's ODE, not one Euler step per stage
