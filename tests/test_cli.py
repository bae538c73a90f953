"""End-to-end CLI: run, validate, explain, sample, plugins, schema, through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def flowspec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flowspec", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny LSD run shared by the tests that read a run folder."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("cli")
    spec = root / "tiny.toml"
    spec.write_text(TINY.format(characterization="lagrangian"))
    out = root / "run"
    proc = flowspec("run", spec, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    # no terminal: a plain progress line instead of the bar (at least the last step's)
    assert "tiny: step 6/6, loss " in proc.stderr, proc.stderr
    return out


def test_run_writes_a_self_describing_folder(run_dir):
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    for expected in ("spec.toml", "environment.json", "metrics.jsonl", "eval.json", "checkpoints/latest",
                     "checkpoints/step-00000003.safetensors", "checkpoints/step-00000006.safetensors",
                     "samples/steps-1.png", "samples/steps-2.npy"):
        assert expected in names
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6]
    assert {"loss", "diagonal", "distill", "lr", "grad_norm", "steps_per_sec"} <= set(log[0])
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result["steps"]) == {"1", "2"} and result["step"] == 6
    assert all(np.isfinite(row["kl"]) and row["energy"] >= 0 for row in result["steps"].values())
    assert json.loads((run_dir / "environment.json").read_text())["seed"] == 7
    samples = np.load(run_dir / "samples" / "steps-2.npy")
    assert samples.shape == (400, 2) and samples.dtype == np.float32


def test_existing_run_folder_is_not_overwritten(run_dir, tmp_path):
    proc = flowspec("run", run_dir / "spec.toml", "--out", run_dir)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{run_dir}: run folder exists (use --force to overwrite, or --out for another)"


def test_sample_writes_float32_from_ema(run_dir, tmp_path):
    out = tmp_path / "x.npy"
    proc = flowspec("sample", run_dir, "--steps", 2, "--n", 123, "--out", out)
    assert proc.returncode == 0, proc.stderr
    x = np.load(out)
    assert x.shape == (123, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    again = tmp_path / "y.npy"
    flowspec("sample", run_dir, "--steps", 2, "--n", 123, "--out", again)
    assert np.array_equal(x, np.load(again))


def test_sample_refuses_a_non_run_folder(tmp_path):
    proc = flowspec("sample", tmp_path, "--out", tmp_path / "x.npy")
    assert proc.returncode == 2 and proc.stderr.strip() == f"{tmp_path}: not a run folder (no spec.toml)"


def test_validate_reports_all_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nkind = "checkerbord"\n[objective]\ncharacterization = "lagrangian"\n'
                   '[train]\nlr = -1\nbatchsize = 3\n')
    proc = flowspec("validate", bad)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(l.startswith(f"{bad}: ") for l in lines)
    assert "Traceback" not in proc.stderr


def test_validate_ok_and_show(tiny_spec):
    path = tiny_spec("eulerian")
    proc = flowspec("validate", path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{path}: ok"
    shown = flowspec("validate", path, "--show", "--set", "train.steps=9").stdout
    assert "steps = 9" in shown and 'stop_gradient = "full"' in shown


def test_explain_names_the_method_and_cost(tiny_spec):
    proc = flowspec("explain", tiny_spec("progressive", 'gamma = "half"'))
    assert proc.returncode == 0, proc.stderr
    assert "PSD-M" in proc.stdout and "1,"[0] in proc.stdout
    assert "c_D = 3" in proc.stdout and "1.50 x flow matching" in proc.stdout
    lsd = flowspec("explain", tiny_spec("lagrangian")).stdout
    assert "LSD" in lsd and "c_D = 1 + C" in lsd and "1.38 x flow matching" in lsd
    esd = flowspec("explain", tiny_spec("eulerian")).stdout
    assert "c_D = 1 + 2C" in esd and "1.00 x flow matching" not in esd


def test_plugins_lists_builtins_with_distribution():
    proc = flowspec("plugins")
    assert proc.returncode == 0
    for name in ("lagrangian", "eulerian", "progressive", "checkerboard", "mlp", "linear", "trig", "kl", "energy"):
        assert name in proc.stdout
    assert "flowspec" in proc.stdout


def test_schema_is_json_with_every_section():
    proc = flowspec("schema")
    schema = json.loads(proc.stdout)
    assert {"data", "objective", "train", "eval", "network", "interpolant"} <= set(schema["properties"])


def test_internal_errors_are_one_line_unless_debug(tiny_spec, monkeypatch):
    path = tiny_spec()
    proc = flowspec("run", path, "--set", "train.device=cuda", "--out", path.parent / "r")
    if proc.returncode == 2:  # no CUDA here: a clean input error
        assert proc.stderr.strip().startswith(f"{path}: train.device: 'cuda' requested")
