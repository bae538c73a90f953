"""``[log] backends``: each tracker's run read back with its own library (TensorBoard's event reader,
MlflowClient, the W&B offline files, the CSV tables); a missing extra is one line at validation; a
tracker failing mid-run warns and the run goes on; one that cannot start stops the run before it
begins; a resumed run continues its trackers' runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from flowspec import runfolder, tracking
from flowspec.checks import installed
from tests.conftest import TINY, invoke

#: the backends whose library is installed here (csv always)
AVAILABLE = ["csv"] + [b for b in ("tensorboard", "mlflow", "wandb") if installed(b)]


def tracked_spec(root: Path, backends: list[str], steps: int = 6) -> Path:
    spec = root / "tiny.toml"
    log = "[log]\nbackends = [" + ", ".join(f'"{b}"' for b in backends) + "]\n"
    spec.write_text(TINY.format(characterization="lagrangian").replace("steps = 6", f"steps = {steps}") + log)
    return spec


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny run tracked by every available backend."""
    root = tmp_path_factory.mktemp("tracked")
    code, _, err = invoke("run", tracked_spec(root, AVAILABLE), "--out", root / "run")
    assert code == 0, err
    return root / "run"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_csv_tables(tracked):
    rows = list(csv.DictReader((tracked / "metrics.csv").open()))
    loss = [(int(r["step"]), float(r["value"])) for r in rows if r["name"] == "loss"]
    assert loss == [(r["step"], r["loss"]) for r in records(tracked) if "loss" in r]
    final = json.loads((tracked / "eval.json").read_text())["steps"]
    kl = {r["name"]: float(r["value"]) for r in rows if r["name"].endswith("/kl") and r["step"] == "6"}
    assert kl == {"eval/steps-1/kl": final["1"]["kl"], "eval/steps-2/kl": final["2"]["kl"]}
    params = dict(csv.reader((tracked / "params.csv").open()))
    assert params["train.lr"] == "0.001" and params["data.kind"] == "checkerboard"
    assert params["eval.steps"] == "[1, 2]" and params["log.backends"] == json.dumps(AVAILABLE)


def test_run_folder_holds_only_flowspec_and_tracker_files(tracked):
    assert runfolder.foreign_entries(tracked) == [] and runfolder.is_run_folder(tracked)
    runfolder.check_forceable(tracked)  # --force may empty it
    for name in ("loss.png", "nfe.png", "metrics.csv", "params.csv"):
        assert (tracked / name).is_file()


def test_tensorboard_scalars_text_and_images(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records(tracked) if "loss" in r]
    final = json.loads((tracked / "eval.json").read_text())["steps"]
    assert [(e.step, e.value) for e in events.Scalars("eval/steps-2/energy")] == [
        (6, pytest.approx(final["2"]["energy"], rel=1e-6))]
    assert {"grad_norm", "lr", "eval/steps-1/kl", "eval/flow_map_error/grid"} <= set(tags["scalars"])
    assert {"plots/loss", "plots/nfe", "plots/samples/steps-1", "plots/samples/steps-2"} <= set(tags["images"])
    assert {"spec/text_summary", "eval/text_summary"} <= set(tags["tensors"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_mlflow_params_metrics_and_artifacts(tracked, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told
    client = MlflowClient(tracking_uri=(tracked / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked.name
    assert run.data.tags["flowspec.run_dir"] == str(tracked.resolve())
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["objective.characterization"] == "lagrangian"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in records(tracked)
                                                    if "loss" in r]
    final = json.loads((tracked / "eval.json").read_text())["steps"]
    assert run.data.metrics["eval/steps-1/kl"] == pytest.approx(final["1"]["kl"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"eval.json", "loss.png", "nfe.png", "samples"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/steps-1.png",
                                                                                    "samples/steps-2.png"}


def test_wandb_offline_run(tracked):
    pytest.importorskip("wandb")
    key = tracking.run_key(tracked)
    (folder,) = (tracked / "wandb").glob(f"offline-run-*-{key}")
    data = (folder / f"run-{key}.wandb").read_bytes()
    for name in (b"train.lr", b"eval/steps-1/kl", b"grad_norm", b"eval-" + key.encode()):
        assert name in data, name


def test_missing_extra_is_one_line_at_validation(tiny_spec, main, monkeypatch):
    spec = tiny_spec()
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    code, _, err = main("validate", spec, "--set", 'log.backends=["csv", "mlflow"]')
    line = f"{spec}: log.backends: \"mlflow\" needs the mlflow extra: pip install 'flowspec[mlflow]'\n"
    assert (code, err) == (2, line)
    code, _, err = main("run", spec, "--set", 'log.backends=["mlflow"]', "--out", spec.parent / "never")
    assert code == 2 and "needs the mlflow extra" in err and not (spec.parent / "never").exists()


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tiny_spec, main, monkeypatch):
    def broken(self, step, values):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(tracking.CSV, "metrics", broken)
    out = tiny_spec().parent / "run"
    code, _, err = main("run", tiny_spec(), "--set", 'log.backends=["csv"]', "--out", out)
    assert code == 0, err
    assert err.count("warning: log.backends: csv: OSError: disk quota exceeded; no more tracking to it") == 1
    assert (out / "eval.json").is_file()


def test_a_tracker_that_cannot_start_stops_the_run_before_it_begins(tiny_spec, main, monkeypatch):
    def refuse(self, *args):
        raise RuntimeError("tracking server unreachable")

    monkeypatch.setattr(tracking.CSV, "__init__", refuse)
    out = tiny_spec().parent / "run"
    code, _, err = main("run", tiny_spec(), "--set", 'log.backends=["csv"]', "--out", out)
    assert (code, err.splitlines()[-1]) == (1, "log.backends: csv: cannot start: RuntimeError: tracking server "
                                               "unreachable")
    assert not out.exists()  # it never started: nothing half-written is left


def test_resume_continues_the_trackers_runs(tmp_path, main, monkeypatch):
    """Train 3 steps, resume to 6 (the backends may change on resume): one MLflow run with the whole
    history, the CSV table rebuilt from the truncated metrics.jsonl, TensorBoard without duplicates."""
    first = [b for b in AVAILABLE if b != "wandb"]
    out = tmp_path / "run"
    assert main("run", tracked_spec(tmp_path, first, steps=3), "--out", out)[0] == 0
    code, _, err = main("run", "--resume", out, "--set", "train.steps=6", "--set",
                        "log.backends=[" + ", ".join(f'"{b}"' for b in AVAILABLE) + "]")
    assert code == 0, err
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [2, 3, 4, 6]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["name"] == "loss"] == steps
    evals = [r["step"] for r in records(out) if "eval" in r]
    assert evals == [3, 6]  # the first run's final evaluation reads as one during the longer run
    assert [int(r["step"]) for r in rows if r["name"] == "eval/steps-1/kl"] == evals
    if "mlflow" in AVAILABLE:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == steps
    if "tensorboard" in AVAILABLE:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == steps


def test_trackers_are_closed_with_the_runs_status(tiny_spec, main, monkeypatch):
    """A run that fails after it started: its MLflow run ends FAILED (KILLED for a signal), the CSV
    table is closed with the records so far."""
    import importlib

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(importlib.import_module("flowspec.train"), "evaluate", broken)  # (flowspec.train: the function)
    backends = [b for b in AVAILABLE if b in ("csv", "mlflow")]
    out = tiny_spec().parent / "run"
    code, _, err = main("run", tiny_spec(), "--set", "log.backends=" + json.dumps(backends), "--out", out)
    assert code == 1 and "evaluation broke" in err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["name"] == "loss"] == [2, 4, 6]
    if "mlflow" in backends:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert run.info.status == "FAILED"


# slow (a torchrun launch of two processes, ~10 s): the default tier keeps the one-process trackers above
@pytest.mark.slow
def test_only_rank_0_tracks_a_data_parallel_run(tmp_path):
    import os
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "flowspec", "run", str(tracked_spec(tmp_path, AVAILABLE)), "--nproc", "2",
                        "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["name"] == "loss"] == [2, 4, 6]  # one writer
    if "tensorboard" in AVAILABLE:
        assert len(list((out / "tensorboard").iterdir())) == 1  # one event file
    if "mlflow" in AVAILABLE:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        assert len(client.search_runs([client.get_experiment_by_name("tiny").experiment_id])) == 1


def test_log_is_not_part_of_a_runs_identity(tiny_spec):
    """How a run is tracked is not what it trains: checkpoints written before [log] existed, or with
    other backends, belong to the same run."""
    from flowspec import checkpoint
    from flowspec.spec import load_spec

    plain = load_spec(tiny_spec())
    logged = load_spec(tiny_spec(), ['log.backends=["csv"]', 'log.wandb_project="x"'])
    assert checkpoint.spec_id(plain) == checkpoint.spec_id(logged)
    assert checkpoint.spec_id(plain) != checkpoint.spec_id(load_spec(tiny_spec(), ["train.lr=0.01"]))
