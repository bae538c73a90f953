"""Using a trained run: ``flowspec.load_run`` (read-only: every file's bytes and mtime unchanged),
samples shaped like the data from the run's eval seed, metrics on demand equal to the run's own
evaluation, ``flowspec eval`` (a new file in evals/, training records untouched) and ``flowspec
sample`` (image shapes, --png, the eval seed; a spec with eval.metric_options)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowspec
from flowspec import runfolder
from flowspec.errors import UserError
from flowspec.flowmap import FlowMap
from tests.conftest import TINY, invoke

#: the tiny spec with metric options (``flowspec sample`` once failed on any run that had them)
SPEC = TINY.format(characterization="lagrangian").replace("num_samples = 400",
                                                         "num_samples = 400\nmetric_options = {kl = {bins = 40}}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    spec = root / "tiny.toml"
    spec.write_text(SPEC)
    code, _, err = invoke("run", spec, "--out", root / "run")
    assert code == 0, err
    return root / "run"


def snapshot(folder):
    """Every file under ``folder``: its bytes and modification time (ns)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_load_run_is_read_only_and_matches_the_runs_own_evaluation(run_dir):
    before = snapshot(run_dir)
    run = flowspec.load_run(run_dir, device="cpu")
    assert run.spec.name == "tiny" and run.step == 6 and run.shape == (2,)
    assert [c.step for c in run.checkpoints] == [3, 6]
    assert all(c.path.is_file() for c in run.checkpoints) and run.checkpoint == run.checkpoints[-1].path
    assert isinstance(run.flow_map, FlowMap) and not run.flow_map.training
    assert not any(p.requires_grad for p in run.flow_map.parameters())
    # samples from eval.seed are the run's own samples/steps-K.npy
    x = run.sample(400, steps=2)
    assert x.shape == (400, 2) and x.dtype == torch.float32
    assert np.array_equal(x.numpy(), np.load(run_dir / "samples" / "steps-2.npy"))
    assert not torch.equal(run.sample(400, steps=2, seed=5), x)
    # metrics on demand: eval.json's numbers (reductions may differ in the last bits across thread counts)
    table, saved = run.evaluate(), json.loads((run_dir / "eval.json").read_text())["steps"]
    assert set(table) == set(saved) == {"1", "2"}
    for k, row in table.items():
        assert row["nfe"] == int(k) and row["seconds"] >= 0
        for name in ("kl", "energy", "flow_map_error"):
            assert row[name] == pytest.approx(saved[k][name], rel=1e-9), (k, name)
    assert run.eval_result["step"] == 6 and [r["step"] for r in run.records if "loss" in r] == [2, 4, 6]
    older = flowspec.load_run(run_dir, device="cpu", step=3)
    assert older.step == 3 and not torch.equal(older.sample(400, steps=2), x)
    assert snapshot(run_dir) == before


def test_evaluate_on_demand(run_dir):
    run = flowspec.load_run(run_dir, device="cpu")
    table = run.evaluate(steps=4, metrics=["kl"], n=300, flow_map_error=False)
    assert list(table) == ["4"] and set(table["4"]) == {"kl", "nfe", "seconds"}
    # the spec's metric options hold (kl bins = 40), and the metric draws from eval.seed + 1
    from flowspec.metrics import HistogramKL

    kl = HistogramKL(HistogramKL.Options(bins=40))
    expected = kl(run.sample(300, steps=4), run.dataset, torch.Generator().manual_seed(run.spec.eval.seed + 1))
    assert table["4"]["kl"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(UserError, match=r"^metrics: unknown metric 'nope' \(known: .*kl"):
        run.evaluate(metrics=["nope"])
    with pytest.raises(UserError, match=r"^steps: 0 is not valid"):
        run.evaluate(steps=[0])
    with pytest.raises(UserError, match=r"^n: -1 is not valid"):
        run.sample(-1)


def test_load_run_refusals(run_dir, tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        flowspec.load_run(tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint at step 4 \(have: 6, 3\)"):
        flowspec.load_run(run_dir, step=4, device="cpu")


def test_eval_command_adds_one_file_and_touches_no_training_record(run_dir, main):
    before = snapshot(run_dir)
    code, out, err = main("eval", run_dir, "--steps", "1,4", "--steps", "8", "--metrics", "kl", "--n", 300,
                          "--device", "cpu")
    assert code == 0, err
    assert "K in [1, 4, 8], 300 samples each, seed 1234, metrics kl" in " ".join(err.split())
    after = snapshot(run_dir)
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("evals/eval-") and new[0].endswith(".json"), new
    assert {k: after[k] for k in before} == before  # metrics.jsonl, eval.json, checkpoints, samples as they were
    assert out.strip().endswith(new[0].split("/")[-1])
    record = json.loads(after[new[0]][0])
    assert record["step"] == 6 and record["checkpoint"] == "step-00000006.safetensors"
    assert record["num_samples"] == 300 and record["seed"] == 1234 and record["metrics"] == ["kl"]
    assert list(record["steps"]) == ["1", "4", "8"] and record["steps"]["8"]["nfe"] == 8
    # a second evaluation is a second file; the folder stays a run folder that --force may empty
    assert main("eval", run_dir, "--steps", "1", "--metrics", "kl", "--n", 100)[0] == 0
    assert len(list((run_dir / "evals").iterdir())) == 2
    assert runfolder.foreign_entries(run_dir) == [] and runfolder.is_run_folder(run_dir)
    (run_dir / "evals" / "notes.txt").write_text("mine")  # but not a file flowspec does not write
    assert runfolder.foreign_entries(run_dir) == ["evals/notes.txt"]
    (run_dir / "evals" / "notes.txt").unlink()


@pytest.mark.parametrize("args, message", [
    (("--steps", "0"), "--steps: '0' is not valid (valid: whole numbers >= 1, e.g. --steps 1,2,4)"),
    (("--steps", "two"), "--steps: 'two' is not valid (valid: whole numbers >= 1, e.g. --steps 1,2,4)"),
    (("--metrics", "kl,fake"), "--metrics: unknown metric 'fake' (known: {metrics})"),
])
def test_eval_command_bad_options(run_dir, main, args, message):
    from flowspec.registry import default_registry

    code, _, err = main("eval", run_dir, *args)
    known = ", ".join(default_registry().names("metrics"))  # the built-ins, and any installed plugin's
    assert (code, err.strip()) == (2, message.format(metrics=known))


def test_sample_uses_the_eval_seed_and_draws_a_png(run_dir, tmp_path, main):
    out, png = tmp_path / "x.npy", tmp_path / "x.png"
    code, stdout, err = main("sample", run_dir, "--steps", 2, "--n", 400, "--out", out, "--png", png)
    assert code == 0, err
    assert " ".join(stdout.split()) == (f"{out} and {png}: 400 samples of shape (2,), 2 steps, "
                                        "from step-00000006.safetensors")
    assert np.array_equal(np.load(out), np.load(run_dir / "samples" / "steps-2.npy"))
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    code, _, err = main("sample", run_dir)
    assert (code, err.strip()) == (2, "sample: nothing to write: give --out FILE.npy, --png FILE.png or both")


def test_sample_keeps_image_shapes(tmp_path, main):
    pytest.importorskip("sklearn")  # the bundled digits
    spec = tmp_path / "digits.toml"
    spec.write_text('[data]\nkind = "digits"\n[network]\nkind = "mlp"\nwidth = 16\ndepth = 1\n'
                    '[objective]\ncharacterization = "lagrangian"\n'
                    '[train]\nsteps = 2\nbatch_size = 8\ncheckpoint_every = 0\ndevice = "cpu"\n'
                    '[eval]\nsteps = [1]\nnum_samples = 64\nmetrics = ["energy"]\nflow_map_error = false\n')
    code, _, err = main("run", spec, "--out", tmp_path / "run")
    assert code == 0, err
    assert np.load(tmp_path / "run" / "samples" / "steps-1.npy").shape == (64, 1, 8, 8)
    out, png = tmp_path / "x.npy", tmp_path / "grid.png"
    code, stdout, err = main("sample", tmp_path / "run", "--n", 64, "--out", out, "--png", png)
    assert code == 0, err
    assert "64 samples of shape (1, 8, 8)" in stdout
    x = np.load(out)
    assert x.shape == (64, 1, 8, 8) and np.array_equal(x, np.load(tmp_path / "run" / "samples" / "steps-1.npy"))
    assert png.is_file()
    run = flowspec.load_run(tmp_path / "run", device="cpu")
    assert run.sample(5).shape == (5, 1, 8, 8)
