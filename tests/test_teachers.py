"""Exact velocities, ODE baselines, ground-truth flow maps and teachers (issue 3; docs/math.md, "Exact oracles")."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowspec import engine
from flowspec.data.analytic import exact_velocity, log_normal_interval
from flowspec.data.toy2d import Checkerboard, EightGaussians, Gaussian, GaussianMixture, Moons
from flowspec.errors import UserError
from flowspec.interpolants import Linear, Trig
from flowspec.ode import ODEOptions, flow_map_error, integrate, true_flow_map
from flowspec.testing import ExactFlowMap, GaussianOracle

F64 = torch.float64
INTERPOLANTS = {"linear": Linear(), "trig": Trig()}


def mc_velocity(dataset, interpolant, c, t: float, x: torch.Tensor, m: int, seed: int):
    """Self-normalized importance estimate of E[dI_t/dt | I_t = x] for each row of x (P, D), with
    x1 ~ data (m draws) weighted by N(x; beta x1, alpha^2 c^2); returns (estimate, standard error),
    the standard error from the weighted variance and the effective sample size."""
    x1 = dataset.sample(m, torch.Generator().manual_seed(seed)).double()
    k = interpolant.coefficients(torch.tensor([t], dtype=F64))
    al, be, ad, bd = (float(v) for v in (k.alpha, k.beta, k.alpha_dot, k.beta_dot))
    c = torch.as_tensor(c, dtype=F64)
    est, se = [], []
    for xi in x:
        w = torch.softmax(-0.5 * (((xi - be * x1) / (al * c)) ** 2).sum(1), 0)
        g = ad * (xi - be * x1) / al + bd * x1
        mean = (w[:, None] * g).sum(0)
        ess = 1 / (w**2).sum()
        est.append(mean)
        se.append(((w[:, None] * (g - mean) ** 2).sum(0) / ess).sqrt())
    return torch.stack(est), torch.stack(se)


# -- exact velocities ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "trig"])
def test_gaussian_velocity_and_true_map_match_the_closed_form(name):
    interp = INTERPOLANTS[name]
    ds = Gaussian(Gaussian.Options(dim=3, mean=[1.0, -0.5, 2.0], std=0.7))
    oracle = GaussianOracle(interp, torch.tensor([1.0, -0.5, 2.0]), 0.7, c=1.3)
    ev = exact_velocity(ds, interp, 1.3)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 3, generator=g, dtype=F64)
    t = torch.rand(64, generator=g, dtype=F64)
    t[:2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(ev.velocity(t, x), oracle.velocity(t, x), rtol=1e-12, atol=1e-12)
    s = t * torch.rand(64, generator=g, dtype=F64)
    torch.testing.assert_close(true_flow_map(ev.velocity, s, t, x), oracle.flow(s, t, x), rtol=0, atol=1e-5)


CASES = [
    ("checkerboard", Checkerboard(), "linear", "data_std"),
    ("checkerboard", Checkerboard(), "trig", 1.0),
    ("gmm", GaussianMixture(), "linear", 1.0),
    ("eight_gaussians", EightGaussians(), "trig", "data_std"),
]


@pytest.mark.parametrize("name,dataset,interp,scale", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_exact_velocity_matches_monte_carlo(name, dataset, interp, scale):
    """b_t(x) against an independent importance-sampling estimate of E[dI_t/dt | I_t = x], within
    5 standard errors (plus 1e-3 for the error of the error) at points drawn from Law(I_t)."""
    interpolant = INTERPOLANTS[interp]
    c = dataset.std().double() if scale == "data_std" else torch.tensor(float(scale), dtype=F64)
    ev = exact_velocity(dataset, interpolant, c)
    g = torch.Generator().manual_seed(1)
    for t in (0.1, 0.5, 0.8):
        k = interpolant.coefficients(torch.tensor([t], dtype=F64))
        x1 = dataset.sample(4, g).double()
        x = float(k.alpha) * c * torch.randn(4, 2, generator=g, dtype=F64) + float(k.beta) * x1
        est, se = mc_velocity(dataset, interpolant, c, t, x, 100_000, seed=int(t * 100))
        b = ev.velocity(torch.full((4,), t, dtype=F64), x)
        assert ((b - est).abs() <= 5 * se + 1e-3).all(), (t, b, est, se)


@pytest.mark.parametrize("interp", ["linear", "trig"])
def test_exact_velocity_carries_base_to_checkerboard(interp):
    ds = Checkerboard()
    c = ds.std().double()
    ev = exact_velocity(ds, INTERPOLANTS[interp], c)
    x0 = c * torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = true_flow_map(ev.velocity, 0.0, 1.0, x0, tol=1e-5)
    cell = torch.floor(y / ds.options.scale)
    inside = ((cell.sum(1) % 2 == 0) & (y.abs() <= 4 + 1e-6).all(1)).double().mean()
    assert inside > 0.99
    # each coordinate is uniform on [-4, 4]: mean 0, variance 16 / 3, within 5 standard errors
    assert (y.mean(0).abs() < 5 * math.sqrt(16 / 3 / 500)).all()
    assert ((y.var(0) - 16 / 3).abs() < 5 * math.sqrt((256 / 5 - (16 / 3) ** 2) / 500)).all()


def test_exact_velocity_carries_base_to_mixture():
    ds = GaussianMixture()
    ev = exact_velocity(ds, Trig(), 1.0)
    n = 1000
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = true_flow_map(ev.velocity, 0.0, 1.0, x0, tol=1e-5)
    w, m, s = ds.mixture()
    mean = w @ m
    var = (w[:, None] * (s[:, None] ** 2 + m**2)).sum(0) - mean**2
    assert ((y.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((y.var(0) - var).abs() / var < 0.15).all()


def test_log_normal_interval_is_accurate_in_tails_and_narrow_intervals():
    a = torch.tensor([-1.0, 30.0, -40.0, 0.3, 5.0], dtype=F64)
    b = torch.tensor([2.0, 31.0, -39.0, 0.3 + 1e-9, 5.0 + 1e-9], dtype=F64)
    got = log_normal_interval(a, b)
    ref = [math.log(0.5 * (math.erf(2 / math.sqrt(2)) - math.erf(-1 / math.sqrt(2))))]
    assert abs(got[0] - ref[0]) < 1e-12
    assert torch.isfinite(got).all()
    # narrow: log(phi(a) (b - a)) to first order
    for i in (3, 4):
        approx = -0.5 * a[i] ** 2 - 0.5 * math.log(2 * math.pi) + math.log(1e-9)
        assert abs(got[i] - approx) < 1e-6
    # far tail: log Phi(-30) - log(1 - ...) ~ -0.5 30^2 - log(30 sqrt(2 pi))
    assert abs(got[1] - (-450 - math.log(30 * math.sqrt(2 * math.pi)))) < 2e-3


def test_no_closed_form_for_moons():
    assert exact_velocity(Moons(), Linear(), 1.0) is None


def test_velocity_is_finite_at_the_ends():
    ev = exact_velocity(Checkerboard(), Linear(), 1.0)
    x = 6 * torch.randn(100, 2, dtype=F64)
    for t in (0.0, 1.0):
        assert torch.isfinite(ev.velocity(torch.full((100,), t, dtype=F64), x)).all()


# -- ODE solvers and NFE ------------------------------------------------------------------------

@pytest.mark.parametrize("solver,per_step,order", [("euler", 1, 1), ("midpoint", 2, 2), ("heun", 2, 2),
                                                   ("rk4", 4, 4)])
def test_fixed_grid_nfe_and_order(solver, per_step, order):
    """NFE = K x stages, and halving the step divides the error by about 2^order."""
    oracle = GaussianOracle(Trig(), torch.tensor([2.0, -1.0]), 0.5, c=1.0)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    exact = oracle.flow(torch.zeros(50, dtype=F64), torch.ones(50, dtype=F64), x)
    errors = []
    for k in (16, 32):
        y, nfe = integrate(oracle.velocity, x, 0.0, 1.0, solver, steps=k)
        assert nfe == k * per_step
        errors.append(float((y - exact).abs().max()))
    assert 2 ** order * 0.7 < errors[0] / errors[1] < 2 ** order * 1.4


def test_euler_one_step_is_x_plus_b0():
    oracle = GaussianOracle(Trig(), 0.5, 0.8, c=1.2, dim=2)
    x = torch.randn(10, 2, dtype=F64)
    y, nfe = integrate(oracle.velocity, x, 0.0, 1.0, "euler", steps=1)
    assert nfe == 1
    torch.testing.assert_close(y, x + oracle.velocity(torch.zeros(10, dtype=F64), x))


def test_dopri5_meets_tolerance_and_counts_calls():
    oracle = GaussianOracle(Trig(), torch.tensor([1.0, 3.0]), 0.3, c=1.0)
    x = torch.randn(20, 2, dtype=F64)
    calls = 0

    def b(t, y):
        nonlocal calls
        calls += 1
        return oracle.velocity(t, y)

    y, nfe = integrate(b, x, 0.0, 1.0, "dopri5", rtol=1e-8, atol=1e-8)
    assert nfe == calls > 6
    exact = oracle.flow(torch.zeros(20, dtype=F64), torch.ones(20, dtype=F64), x)
    assert (y - exact).abs().max() < 1e-6


def test_flow_map_error_is_zero_for_the_exact_map_and_positive_when_perturbed():
    interp = Linear()
    oracle = GaussianOracle(interp, torch.tensor([1.0, -1.0]), 0.5, c=1.0)
    ds = Gaussian(Gaussian.Options(dim=2, mean=[1.0, -1.0], std=0.5))
    truth = exact_velocity(ds, interp, 1.0).velocity
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(200, 2, generator=g, dtype=F64), ds.sample(200, g).double()
    err = flow_map_error(ExactFlowMap(oracle), truth, x0, x1, interp)
    assert err["grid"] < 1e-10 and err["0-1"] < 1e-10
    bad = flow_map_error(ExactFlowMap(oracle, eps=0.3), truth, x0, x1, interp)
    assert bad["grid"] > 1e-3 and bad["0-1"] > 1e-3


def test_ode_labels():
    assert ODEOptions(solver="euler", steps=8).label() == "euler K=8"
    assert ODEOptions(rtol=1e-4, atol=1e-4, velocity="exact").label() == "exact dopri5 tol=0.0001"


# -- specs, compile and eval --------------------------------------------------------------------

def compile_tiny(tiny_spec, extra="", overrides=()):
    from flowspec.compile import compile_spec
    from flowspec.spec import load_spec

    return compile_spec(load_spec(tiny_spec(extra=extra), list(overrides)))


def test_teacher_target_without_teacher_is_a_compile_error(tiny_spec):
    with pytest.raises(UserError, match=r"objective.target: \"teacher\" needs a \[teacher\] section"):
        compile_tiny(tiny_spec, overrides=["objective.target=teacher"])


def test_analytic_teacher_needs_a_closed_form(tiny_spec):
    with pytest.raises(UserError, match="teacher.kind"):
        compile_tiny(tiny_spec, '[teacher]\nkind = "analytic"\n',
                     ["objective.target=teacher", "data.kind=moons"])


def test_run_teacher_needs_a_run_folder(tiny_spec, tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        compile_tiny(tiny_spec, f'[teacher]\nkind = "run"\npath = "{tmp_path}"\n', ["objective.target=teacher"])


def test_teacher_section_validation(tiny_spec):
    from flowspec.spec import load_spec

    with pytest.raises(UserError, match="teacher"):
        load_spec(tiny_spec(extra='[teacher]\nkind = "run"\n'))


def test_analytic_teacher_is_the_exact_velocity_and_lmd_trains(tiny_spec):
    g = compile_tiny(tiny_spec, '[teacher]\nkind = "analytic"\n', ["objective.target=teacher"])
    assert g.teacher is g.exact is g.frozen_teacher
    loss = engine.step(g).loss
    assert torch.isfinite(loss)


def test_resolved_spec_with_teacher_and_ode_reads_back(tiny_spec):
    from flowspec.spec import load_spec, to_toml, tomllib, validate

    extra = '[teacher]\nkind = "analytic"\n'
    spec = load_spec(tiny_spec(extra=extra), ["objective.target=teacher",
                                              'eval.ode=[{solver = "euler", steps = 3}, {solver = "dopri5"}]'])
    again = validate(tomllib.loads(to_toml(spec)))
    assert again == spec and again.eval.ode[0].steps == 3 and again.teacher.kind == "analytic"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny flow-matching run to distill from, through the console entry point (in this process)."""
    from tests.conftest import TINY, invoke

    root = tmp_path_factory.mktemp("teacher")
    spec = root / "fm.toml"
    spec.write_text(TINY.format(characterization="flow_matching")
                    .replace("[eval]", '[eval]\nflow_map_error = false\node = [{solver = "euler", steps = 4}]'))
    out = root / "run"
    code, _, err = invoke("run", spec, "--out", out)
    assert code == 0, err
    return out


def test_eval_json_has_ode_rows(teacher_run):
    result = json.loads((teacher_run / "eval.json").read_text())
    assert set(result["steps"]) == {"1", "2"}
    row = result["ode"]["euler K=4"]
    assert row["nfe"] == 4 and row["seconds"] > 0 and math.isfinite(row["kl"])
    assert "flow_map_error" not in result


def test_run_teacher_is_the_frozen_ema_diagonal(tiny_spec, teacher_run):
    from flowspec import checkpoint

    extra = f'[teacher]\nkind = "run"\npath = "{teacher_run}"\n'
    g = compile_tiny(tiny_spec, extra, ["objective.target=teacher", "objective.characterization=progressive"])
    assert all(not p.requires_grad for p in g.teacher.flow_map.parameters())
    path = checkpoint.latest(teacher_run)
    tensors = checkpoint.load_tensors(path)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    sd = g.teacher.flow_map.state_dict()
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(g.teacher.velocity(t, x), g.teacher.flow_map.v(t, t, x))
    s = t / 2
    # the teacher's map is its ODE integrated over [s, t], not one Euler step
    X, _ = integrate(g.teacher.velocity, x, s, t, "dopri5", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x + (t - s)[:, None] * g.teacher.v(s, t, x), X, atol=2e-4, rtol=0)
    assert (X - (x + (t - s)[:, None] * g.teacher.velocity(s, x))).abs().max() > 1e-2  # not one Euler step
    assert torch.isfinite(engine.step(g).loss)


def test_run_teacher_data_shape_must_match(tiny_spec, teacher_run):
    extra = f'[teacher]\nkind = "run"\npath = "{teacher_run}"\n'
    with pytest.raises(UserError, match="data shape"):
        compile_tiny(tiny_spec, extra, ["objective.target=teacher", "data.kind=gaussian", "data.dim=3"])


def test_cli_sample_with_a_solver_prints_nfe(teacher_run, tmp_path, main):
    import re

    import numpy as np

    out = tmp_path / "ode.npy"
    code, stdout, err = main("sample", teacher_run, "--solver", "midpoint", "--steps", 3, "--n", 50, "--out", out)
    assert code == 0, err
    # midpoint: 2 velocity evaluations per step, 3 steps (rich wraps the line at 80 columns)
    assert re.fullmatch(rf"{re.escape(str(out))}: 50 samples of shape \(2,\), ODE midpoint K=3, NFE 6, [0-9.]+ s, "
                        r"from step-00000006\.safetensors", " ".join(stdout.split())), stdout
    assert np.load(out).shape == (50, 2)
    code, _, err = main("sample", teacher_run, "--solver", "rk45", "--out", out)
    assert code == 2 and err.startswith("--solver: 'rk45' is not valid (valid: euler, "), err


def test_every_shipped_spec_validates():
    from pathlib import Path

    from flowspec.errors import UserError
    from flowspec.registry import default_registry
    from flowspec.spec import load_spec

    # .ci/run installs the example plugin after the suite; FLOWSPEC_BUILTINS_ONLY=1 ignores it
    plugin = "power" in default_registry().names("interpolants")
    specs = sorted((Path(__file__).parent.parent / "specs").glob("*.toml"))
    assert len(specs) >= 10
    for path in specs:
        if path.name == "checkerboard-huber.toml" and not plugin:
            with pytest.raises(UserError, match="unknown name 'power'"):
                load_spec(path)
            continue
        load_spec(path)

