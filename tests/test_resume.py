"""Runs that survive: SIGKILL + resume is bit-identical, signals checkpoint and stop, corrupted
checkpoints are skipped, non-finite steps stop or are skipped, checkpoints are pruned."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowspec import checkpoint, engine
from flowspec.compile import compile_spec
from flowspec.errors import UserError
from flowspec.spec import load_spec
from flowspec.train import resume, train

STEPS = 12
LONG = """
name = "long"

[data]
kind = "checkerboard"

[network]
kind = "mlp"
width = 16
depth = 1
embedding_dim = 4

[objective]
characterization = "lagrangian"

[train]
steps = {steps}
batch_size = 32
log_every = 3
checkpoint_every = 2
keep_checkpoints = 3
schedule = "cosine"
seed = 11
device = "cpu"

[eval]
steps = [1]
num_samples = 100
metrics = ["energy"]
every = 4
plot = false
"""


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flowspec", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Poll until checkpoint ``step`` is complete (renamed into place) or the process ends."""
    target = run_dir / "checkpoints" / f"step-{step:08d}.safetensors"
    deadline = time.monotonic() + timeout
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()}"


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS:08d}.safetensors"))


def training_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (which differ between any two runs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for key in ("steps_per_sec", "elapsed"):
            r.pop(key, None)
        for row in r.get("eval", {}).values():
            row.pop("seconds")
    return records


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "long.toml"
    path.write_text(LONG.format(steps=STEPS))
    return path


@pytest.fixture(scope="module")
def reference(spec_path) -> Path:
    """The uninterrupted run (in this process: the same computation as ``flowspec run``)."""
    out = spec_path.parent / "reference"
    out.mkdir()
    train(compile_spec(load_spec(spec_path)), out)
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = final_tensors(run_dir), final_tensors(reference)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert training_records(run_dir) == training_records(reference)
    assert json.loads((run_dir / "eval.json").read_text())["steps"]["1"]["energy"] == \
        json.loads((reference / "eval.json").read_text())["steps"]["1"]["energy"]


def test_sigkill_then_resume_is_bit_identical(spec_path, reference, tmp_path, main):
    """A real process, killed with SIGKILL a few milliseconds after a random checkpoint; resumed
    through the same entry point as ``flowspec run --resume`` (in this process, to save a start-up)."""
    rng = random.Random(5)
    run_dir = tmp_path / "killed"
    proc = start("run", spec_path, "--out", run_dir)
    wait_for_checkpoint(run_dir, proc, rng.choice([2, 4, 6]))
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the following steps, mid-write included
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    code, out, err = main("run", "--resume", run_dir)
    assert code == 0, err
    assert out.strip() == str(run_dir)
    assert_same_run(run_dir, reference)
    assert not list(run_dir.rglob(".*.*"))  # no temporary files left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(spec_path, reference, tmp_path, sig, main,
                                                           monkeypatch):
    step = engine.step

    def step_then_signal(graph):
        out = step(graph)
        if graph.step_count == 7:  # as if the signal arrived during step 7
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(engine, "step", step_then_signal)
    run_dir = tmp_path / "signalled"
    code, _, err = main("run", spec_path, "--out", run_dir)
    assert code == 128 + sig
    assert err.strip().splitlines()[-1] == (f"{signal.Signals(sig).name}: stopped at step 7 with a checkpoint; "
                                            f"resume with: flowspec run --resume {run_dir}")
    assert checkpoint.pointer(run_dir / "checkpoints") == "step-00000007"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(engine, "step", step)
    code, out, err = main("run", "--resume", run_dir)
    assert code == 0, err
    assert "(resumed at step 7)" in err
    assert_same_run(run_dir, reference)


def test_resume_with_a_different_spec_names_the_keys(spec_path, reference, tmp_path, main):
    other = tmp_path / "other.toml"
    other.write_text(LONG.format(steps=STEPS).replace("width = 16", "width = 8").replace("seed = 11", "seed = 12"))
    code, _, err = main("run", other, "--resume", reference)
    assert code == 2
    assert err.strip() == (f"{other}: differs from the run's spec {reference / 'spec.toml'} in "
                           "network.width, train.seed (only train.steps and [log] may change on resume)")
    code, _, err = main("run", "--resume", reference, "--set", "train.lr=0.1")
    assert code == 2 and err.strip() == (f"--set: differs from the run's spec {reference / 'spec.toml'} in "
                                         "train.lr (only train.steps and [log] may change on resume)")


def test_resume_with_a_shorter_budget_is_refused(reference, main):
    code, _, err = main("run", "--resume", reference, "--set", "train.steps=5")
    assert code == 2
    assert err.strip() == f"--set: train.steps: 5 is below the checkpoint's step {STEPS} (valid: >= {STEPS})"


def test_resume_with_a_longer_budget_continues(reference, tmp_path, main):
    import shutil

    run_dir = tmp_path / "longer"
    shutil.copytree(reference, run_dir)
    code, _, err = main("run", "--resume", run_dir, "--set", f"train.steps={STEPS + 2}")
    assert code == 0, err
    assert checkpoint.pointer(run_dir / "checkpoints") == f"step-{STEPS + 2:08d}"
    assert f"steps = {STEPS + 2}\n" in (run_dir / "spec.toml").read_text()
    tail = [(r["step"], "eval" in r) for r in training_records(run_dir)][-4:]
    assert tail == [(STEPS, False), (STEPS, True), (STEPS + 2, False), (STEPS + 2, True)]


def test_resume_of_a_non_run_folder(tmp_path, main):
    code, _, err = main("run", "--resume", tmp_path)
    assert code == 2 and err.strip() == f"{tmp_path}: not a run folder (no spec.toml)"


def test_run_needs_a_spec_or_resume(main, tmp_path):
    code, _, err = main("run")
    assert code == 2
    assert err.strip() == "run: missing the spec file (usage: flowspec run SPEC, or flowspec run --resume RUN_DIR)"
    code, _, err = main("run", "--resume", tmp_path, "--force")
    assert (code, err.strip()) == (2, "run: --resume continues RUN_DIR in place; --out and --force do not apply to it")


def test_only_the_newest_checkpoints_are_kept(reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["latest"] + [f"step-{k:08d}.safetensors" for k in (STEPS - 4, STEPS - 2, STEPS)]


# -- corrupted checkpoints (in process) ---------------------------------------------------------------

def copy_of(reference, tmp_path):
    """A private copy of the finished reference run: (its resolved spec, the folder)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return load_spec(run_dir / "spec.toml"), run_dir


def test_corrupted_latest_falls_back_to_the_previous_good_checkpoint(reference, tmp_path):
    spec, run_dir = copy_of(reference, tmp_path)
    ckpt = run_dir / "checkpoints"
    last = ckpt / "step-00000012.safetensors"
    truncated = ckpt / "step-00000010.safetensors"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    last.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:100])
    warnings: list[str] = []
    assert checkpoint.latest(run_dir, warnings.append) == ckpt / "step-00000008.safetensors"
    damaged = "checksum mismatch: the checkpoint is truncated or corrupted; skipped for the previous checkpoint"
    assert warnings == [f"warning: {last}: {damaged}", f"warning: {truncated}: {damaged}"]
    graph = resume(run_dir, spec, "spec.toml", warnings.append)
    assert graph.step_count == 8
    assert checkpoint.stems(ckpt) == ["step-00000008"]  # the bad newer ones are gone: they come again
    # the log is cut back to step 8 (losses every 3 steps, evaluations every 4)
    assert [(r["step"], "eval" in r) for r in training_records(run_dir)] == [
        (3, False), (4, True), (6, False), (8, True)]


def test_a_pointer_to_a_missing_or_garbage_checkpoint_falls_back(reference, tmp_path):
    _, run_dir = copy_of(reference, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-00000012.safetensors").unlink()  # latest still names it
    warnings: list[str] = []
    assert checkpoint.latest(run_dir, warnings.append) == ckpt / "step-00000010.safetensors"
    (ckpt / "latest").write_text("garbage")
    assert checkpoint.latest(run_dir, warnings.append) == ckpt / "step-00000010.safetensors"
    (ckpt / "latest").unlink()
    assert checkpoint.latest(run_dir, warnings.append) == ckpt / "step-00000010.safetensors"
    assert warnings == []  # the pointer is a hint: nothing is lost without it


def test_all_checkpoints_bad_is_one_line(reference, tmp_path, main):
    _, run_dir = copy_of(reference, tmp_path)
    for k in (8, 10):
        (run_dir / "checkpoints" / f"step-{k:08d}.safetensors").unlink()
    (run_dir / "checkpoints" / "step-00000012.safetensors").write_bytes(b"")
    code, _, err = main("sample", run_dir, "--out", tmp_path / "x.npy")
    assert code == 1
    assert err.strip().splitlines() == [
        f"warning: {run_dir / 'checkpoints' / 'step-00000012.safetensors'}: checksum mismatch: the checkpoint "
        "is truncated or corrupted; skipped for the previous checkpoint",
        f"{run_dir}: no complete checkpoint found in {run_dir / 'checkpoints'}"]


def test_crafted_pickle_is_never_unpickled(reference, tmp_path, main):
    """A pickle that would run code, renamed as a checkpoint, with metadata whose checksum matches."""
    import pickle

    _, run_dir = copy_of(reference, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = run_dir / "checkpoints" / "step-00000012.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match=rf"^{path}: not a safetensors file \("):
        checkpoint.read(path, 1 << 30)
    code, out, err = main("sample", run_dir, "--out", tmp_path / "x.npy")
    lines = err.strip().splitlines()
    assert code == 0 and lines[0].startswith(f"warning: {path}: not a safetensors file (")
    assert "from step-00000010.safetensors" in out and not marker.exists()


def test_restore_refuses_a_checkpoint_of_another_network(reference, tmp_path):
    _, run_dir = copy_of(reference, tmp_path)
    path = run_dir / "checkpoints" / "step-00000012.safetensors"
    wide = compile_spec(load_spec(run_dir / "spec.toml", ["network.depth=2"]))
    with pytest.raises(UserError) as info:
        checkpoint.restore(wide, checkpoint.read(path, 1 << 30))
    assert info.value.lines == [f"{path}: checkpoint does not match the network (missing: net.layers.4.bias, "
                                "net.layers.4.weight; wrong shape: net.layers.2.bias, net.layers.2.weight)"]


# -- numerical faults ----------------------------------------------------------------------------------

def poison(graph, at_step: int, term: str = "distill") -> None:
    """Make the loss term ``term`` NaN on step ``at_step`` (1-based) of ``graph``."""
    loss_at = graph.objective.loss_at  # what the step calls on its batch (after drawing the times)

    def poisoned(*args):
        out = loss_at(*args)
        if graph.step_count + 1 == at_step:
            out.logs[term] = out.logs[term] * float("nan")
            out.loss = out.loss * float("nan")
            out.logs["loss"] = out.loss.detach()
        return out

    graph.objective.loss_at = poisoned


def tiny_graph(tiny_spec, *overrides: str):
    return compile_spec(load_spec(tiny_spec(), ["eval.plot=false", "eval.metrics=[\"energy\"]", "eval.num_samples=50",
                                                "eval.steps=[1]", "train.keep_checkpoints=0", *overrides]))


def test_nonfinite_loss_stops_naming_step_and_term(tiny_spec, tmp_path):
    graph = tiny_graph(tiny_spec, "train.checkpoint_every=2")
    poison(graph, at_step=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(UserError) as info:
        train(graph, run_dir)
    assert info.value.exit_code == 1
    assert info.value.lines == ["step 4: loss term 'distill' is nan; stopped, the last good checkpoint "
                                "(step-00000002) stays latest; set train.nonfinite = \"skip\" to skip such steps"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-00000002.safetensors"]
    assert [r["step"] for r in training_records(run_dir)] == [2]


def test_nonfinite_gradient_is_named(tiny_spec, tmp_path):
    graph = tiny_graph(tiny_spec)
    weight = next(graph.model.parameters())
    weight.register_hook(lambda g: g * float("nan") if graph.step_count == 0 else g)
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"^step 1: gradient norm is nan \(loss [0-9.]+\); stopped, the last "
                                        r"good checkpoint \(none yet\) is kept; "):
        train(graph, tmp_path / "run")


def test_nonfinite_steps_can_be_skipped(tiny_spec, tmp_path):
    graph = tiny_graph(tiny_spec, "train.nonfinite=\"skip\"", "train.log_every=1")
    reference = tiny_graph(tiny_spec)
    for _ in range(3):
        engine.step(graph), engine.step(reference)
    poison(graph, at_step=4, term="diagonal")
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in graph.ema.model.state_dict().items()}
    engine.step(graph)
    assert graph.last_fault == "diagonal" and graph.step_count == 4 and graph.ema.updates == 3
    assert all(torch.equal(before[k], v) for k, v in graph.model.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in graph.ema.model.state_dict().items())
    assert graph.scheduler.last_epoch == 4  # the schedule keeps its pace

    graph = tiny_graph(tiny_spec, "train.nonfinite=\"skip\"", "train.log_every=1")
    poison(graph, at_step=4, term="diagonal")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(graph, run_dir)
    records = [r for r in training_records(run_dir) if "loss" in r]
    assert [r["nonfinite_skipped"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert records[3]["loss"] is None and records[3]["diagonal"] is None
    assert checkpoint.read(checkpoint.latest(run_dir), 1 << 30).state["counters"] == {"nonfinite_skipped": 1}
