"""``flowspec check RUN``: the flow-map residuals of a trained run, with their spread (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import invoke

SPEC = """
name = "tiny-gaussian"

[data]
kind = "gaussian"
dim = 2
mean = [1.0, -0.5]
std = 0.5

[interpolant]
kind = "linear"

[network]
kind = "mlp"
width = 32
depth = 2

[objective]
characterization = "lagrangian"

[train]
steps = 400
batch_size = 256
lr = 0.003
log_every = 100
checkpoint_every = 20
keep_checkpoints = 0
seed = 3
device = "cpu"

[eval]
steps = [1]
num_samples = 200
metrics = ["energy"]
flow_map_error = false
"""


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    (root / "g.toml").write_text(SPEC)
    code, _, err = invoke("run", root / "g.toml", "--out", root / "run")
    assert code == 0, err
    return root / "run"


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_check_reports_a_tangent_residual_that_falls_with_training(gaussian_run, tmp_path, main):
    before = snapshot(gaussian_run)
    results = {}
    for step in (20, 400):
        code, out, err = main("check", gaussian_run, "--step", step, "--n", 1000, "--json", tmp_path / f"{step}.json")
        assert code == 0, err
        assert f"step-{step:08d}.safetensors, velocity exact, 1000 points" in out
        for label in ("Lagrangian |dX/dt - b_t(X)|", "Eulerian   |dX/ds + grad X b_s|",
                      "semigroup  |X_ut(X_su) - X_st|"):
            line = next(line for line in out.splitlines() if label in line)
            assert " ± " in line and "median" in line and "90%" in line
        results[step] = json.loads((tmp_path / f"{step}.json").read_text())
    early, late = (results[k]["residuals"]["lagrangian"] for k in (20, 400))
    # measured: 1.78 +- 0.99 at step 20, 0.81 +- 0.63 at step 400
    assert late["mean"] < 0.75 * early["mean"] and late["median"] < early["median"]
    assert all(r["std"] > 0 and r["q90"] >= r["median"] for r in (early, late))
    assert snapshot(gaussian_run) == before  # read only


def test_check_names_a_missing_checkpoint(gaussian_run, main):
    code, _, err = main("check", gaussian_run, "--step", 7)
    assert code == 1
    assert err.startswith(f"{gaussian_run}: no checkpoint at step 7 (have: 400, 380"), err


def test_explain_prints_the_whole_formula_and_the_teacher_cost(tiny_spec, main):
    from flowspec.objectives.progressive import Progressive

    spec = tiny_spec("progressive", extra='[teacher]\nkind = "analytic"\n')
    code, out, err = main("explain", spec, "--set", "objective.target=teacher")
    assert code == 0, err
    lines = out.splitlines()
    # progressive distillation (target teacher), not PSD; the name says --set changed the method
    assert lines[0] == "tiny+pd: PD"
    cost = "  cost per step     ((1 - eta) c_D + eta) B with "
    assert cost + "c_D = 1, C = 1.5: ~64 forward passes (1.00 x flow matching)" in lines
    assert ("+ 2 adaptive dopri5 solves of the teacher's ODE (tol 1e-07; about 60-150 teacher evaluations each "
            "on Gaussian targets; logged as teacher_nfe) per off-diagonal sample") in out
    formula = ["    " + line for line in Progressive.formula.splitlines()]
    start = lines.index(formula[0])
    assert lines[start:start + len(formula)] == formula  # every line of the class attribute, in order
    code, rk4, _ = main("explain", spec, "--set", "objective.target=teacher", "--set", "objective.teacher_solver=rk4",
                        "--set", "objective.teacher_steps=8")
    assert code == 0
    assert "+ 2 x 32 teacher evaluations (2 stages of rk4, K = 8) per off-diagonal sample" in rk4
