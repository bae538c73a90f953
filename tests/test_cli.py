"""End-to-end CLI: run, validate, explain, sample, plugins, schema, through the console entry point
(:func:`flowspec.cli.main`, in this process: the same exit codes and one-line errors a user sees;
tests/test_safety.py, test_resume.py and test_distributed.py run it as real processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY, invoke


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny LSD run shared by the tests that read a run folder."""
    root = tmp_path_factory.mktemp("cli")
    spec = root / "tiny.toml"
    spec.write_text(TINY.format(characterization="lagrangian"))
    out = root / "run"
    code, stdout, stderr = invoke("run", spec, "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    # no terminal: a plain progress line instead of the bar (at least the last step's)
    assert "tiny: step 6/6, loss " in stderr, stderr
    return out


def test_run_writes_a_self_describing_folder(run_dir):
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    for expected in ("spec.toml", "environment.json", "metrics.jsonl", "eval.json", "checkpoints/latest",
                     "checkpoints/step-00000003.safetensors", "checkpoints/step-00000006.safetensors",
                     "samples/steps-1.png", "samples/steps-2.npy", "loss.png", "nfe.png"):
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


def test_existing_run_folder_is_not_overwritten(run_dir, main):
    code, _, err = main("run", run_dir / "spec.toml", "--out", run_dir)
    assert code == 2
    assert err.strip() == f"{run_dir}: run folder exists (use --force to overwrite, or --out for another)"


def test_sample_writes_float32_from_ema(run_dir, tmp_path, main):
    out = tmp_path / "x.npy"
    code, stdout, err = main("sample", run_dir, "--steps", 2, "--n", 123, "--out", out)
    assert code == 0, err
    # (rich wraps the line at 80 columns when stdout is not a terminal)
    assert " ".join(stdout.split()) == f"{out}: 123 samples of shape (2,), 2 steps, from step-00000006.safetensors"
    x = np.load(out)
    assert x.shape == (123, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    again = tmp_path / "y.npy"
    assert main("sample", run_dir, "--steps", 2, "--n", 123, "--out", again)[0] == 0
    assert np.array_equal(x, np.load(again))


def test_sample_refuses_a_non_run_folder(tmp_path, main):
    code, _, err = main("sample", tmp_path, "--out", tmp_path / "x.npy")
    assert code == 2 and err.strip() == f"{tmp_path}: not a run folder (no spec.toml)"


def test_validate_reports_all_errors_without_traceback(tmp_path, main):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nkind = "checkerbord"\n[objective]\ncharacterization = "lagrangian"\n'
                   '[train]\nlr = -1\nbatchsize = 3\n')
    code, out, err = main("validate", bad)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert lines[0].startswith(f"{bad}: data.kind: unknown name 'checkerbord' (known: checkerboard, ")
    assert lines[1] == f"{bad}: train.lr: must be greater than 0 (got -1)"
    assert lines[2].startswith(f"{bad}: train.batchsize: unknown key (valid: steps, batch_size, ")


def test_validate_ok_and_show(tiny_spec, main):
    path = tiny_spec("eulerian")
    code, out, _ = main("validate", path)
    assert code == 0 and out.strip() == f"{path}: ok"
    code, shown, _ = main("validate", path, "--show", "--set", "train.steps=9")
    assert code == 0
    assert "\n[train]\nsteps = 9\n" in shown and '\nstop_gradient = "full"\n' in shown


def test_explain_names_the_method_and_cost(tiny_spec, main):
    """The method's name (gamma = 1/2: the midpoint variant PSD-M), the network's size and the
    cost line, whose numbers check each other: ((1 - eta) c_D + eta) B forward passes for
    eta = 0.75, B = 64 (flow matching: B), with c_D = 3 (PSD), 1 + C (LSD), 1 + 2C (ESD), C = 1.5."""
    code, out, err = main("explain", tiny_spec("progressive", 'gamma = "half"'))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "tiny: PSD-M"
    # MLP on (x, s, t): (2 + 2) * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2 = 1282 parameters
    assert "  network           mlp: 1,282 parameters; X = x + (t - s) v(s, t, x)" in out
    cost = "  cost per step     ((1 - eta) c_D + eta) B with "
    assert cost + "c_D = 3, C = 1.5: ~96 forward passes (1.50 x flow matching)" in lines
    code, lsd, _ = main("explain", tiny_spec("lagrangian"))
    assert code == 0 and lsd.splitlines()[0] == "tiny: LSD"
    assert cost + "c_D = 1 + C, C = 1.5: ~88 forward passes (1.38 x flow matching)" in lsd.splitlines()
    code, esd, _ = main("explain", tiny_spec("eulerian"))
    assert code == 0 and esd.splitlines()[0] == "tiny: ESD"
    assert cost + "c_D = 1 + 2C, C = 1.5: ~112 forward passes (1.75 x flow matching)" in esd.splitlines()


def test_plugins_lists_builtins_with_distribution(main):
    import flowspec

    code, out, _ = main("plugins")
    assert code == 0
    # table rows "│ group │ name │ distribution │ version │ status │"
    rows = {cells[1]: cells for line in out.splitlines() if line.count("│") == 6
            for cells in [[c.strip() for c in line.split("│")[1:-1]]]}
    for group, name in [("objectives", "lagrangian"), ("objectives", "eulerian"), ("objectives", "progressive"),
                        ("datasets", "checkerboard"), ("networks", "mlp"), ("interpolants", "linear"),
                        ("interpolants", "trig"), ("metrics", "kl"), ("metrics", "energy")]:
        assert rows[name] == [group, name, "flowspec", flowspec.__version__, "ok"], rows.get(name)


def test_schema_is_json_with_every_section(main):
    code, out, _ = main("schema")
    schema = json.loads(out)
    assert code == 0
    assert {"data", "objective", "train", "eval", "network", "interpolant"} <= set(schema["properties"])


def test_internal_errors_are_one_line_unless_debug(tiny_spec, monkeypatch, main):
    """An unexpected exception (not a UserError) is one line and exit 1; FLOWSPEC_DEBUG=1 lets it
    through (a subprocess would print its traceback)."""
    path = tiny_spec()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("flowspec.cli._load", broken)
    monkeypatch.delenv("FLOWSPEC_DEBUG", raising=False)
    assert main("validate", path) == (1, "", "flowspec: internal error: RuntimeError: boom "
                                             "(set FLOWSPEC_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("FLOWSPEC_DEBUG", "1")
    with pytest.raises(RuntimeError, match="^boom$"):
        main("validate", path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_cuda_without_a_device_is_a_clean_input_error(tiny_spec, main):
    path = tiny_spec()
    code, _, err = main("run", path, "--set", "train.device=cuda", "--out", path.parent / "r")
    assert (code, err) == (2, f"{path}: train.device: 'cuda' requested but no CUDA device is available "
                              "(valid: auto, cpu)\n")
    assert not (path.parent / "r").exists()
