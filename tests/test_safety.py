"""Nothing a user owns is lost and nothing a run trusts goes unverified: --force on user folders,
the run-folder lock, checkpoint damage of every kind, pinned teachers, strict end files."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from flowspec import checkpoint, runfolder
from flowspec.compile import compile_spec
from flowspec.errors import UserError
from flowspec.spec import load_spec
from flowspec.train import train


@pytest.fixture
def finished(tiny_spec, tmp_path) -> Path:
    """A finished tiny run (checkpoints at steps 3 and 6)."""
    out = tmp_path / "run"
    out.mkdir()
    train(compile_spec(load_spec(tiny_spec(), ["eval.plot=false", 'eval.metrics=["energy"]'])), out)
    return out


# -- --force --------------------------------------------------------------------------------------

def test_force_refuses_the_working_directory_and_its_ancestors(tiny_spec, tmp_path, main, monkeypatch):
    spec = tiny_spec()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    for target, what in ((".", "the working directory"), ("..", "a folder above the working directory")):
        code, _, err = main("run", spec, "--out", target, "--force")
        assert (code, err.strip()) == (2, f"{target}: --force: refusing to empty {what}; name a run folder with --out")
    assert (work / "notes.txt").read_text() == "mine" and spec.exists()


def test_force_refuses_a_folder_with_other_files(tiny_spec, finished, tmp_path, main):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    code, _, err = main("run", tiny_spec(), "--out", user, "--force")
    assert code == 2 and err.strip() == (f"{user}: --force: not a flowspec run folder (it holds thesis.tex); "
                                         "--force empties only run folders: choose another --out")
    (finished / "checkpoints" / "keep.me").write_text("x")  # a run folder with a foreign file in it
    code, _, err = main("run", tiny_spec(), "--out", finished, "--force")
    assert code == 2 and "it holds checkpoints/keep.me" in err and (finished / "spec.toml").exists()
    assert (user / "thesis.tex").exists()


def test_force_replaces_a_run_folder(tiny_spec, finished, main):
    old = (finished / "metrics.jsonl").read_text()
    code, out, err = main("run", tiny_spec(), "--out", finished, "--force", "--set", "train.steps=2")
    assert code == 0, err
    assert (finished / "metrics.jsonl").read_text() != old
    assert checkpoint.stems(finished / "checkpoints") == ["step-00000002"]


def test_automatic_names_never_collide(tmp_path):
    made = {runfolder.make("same", tmp_path) for _ in range(3)}
    assert len(made) == 3 and all(p.parent == tmp_path and p.name.startswith("same-") for p in made)
    for p in made:
        runfolder.release(p)


# -- the lock -------------------------------------------------------------------------------------

def hold(run_dir: Path) -> int:
    """Lock the folder the way another flowspec process would (another open file description)."""
    fd = os.open(run_dir / runfolder.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242\n", 0)
    return fd


def test_a_live_run_refuses_resume_and_a_second_writer(tiny_spec, finished, main):
    fd = hold(finished)
    try:
        live = (f"{finished}: a flowspec process (pid 4242) is training in this run folder; "
                "wait for it to end (or stop it) first")
        for args in (("run", "--resume", finished), ("run", tiny_spec(), "--out", finished, "--force")):
            code, _, err = main(*args)
            assert (code, err.strip()) == (2, live)
    finally:
        os.close(fd)  # the lock goes with the descriptor, as it goes with a killed process
    code, _, err = main("run", "--resume", finished)
    assert code == 0, err


# -- checkpoint integrity -------------------------------------------------------------------------

def resumed_from(run_dir: Path, spec) -> tuple[int, list[str]]:
    from flowspec.train import resume

    warnings: list[str] = []
    graph = resume(run_dir, spec, "spec.toml", warnings.append)
    runfolder.release(run_dir)
    return graph.step_count, warnings


def test_any_damaged_byte_of_the_newest_checkpoint_falls_back(finished, tmp_path):
    """Header length, header JSON (tensor index and the state: step, lr, EMA count), tensor data:
    one flipped bit anywhere is caught, and the run continues from the previous checkpoint."""
    newest = finished / "checkpoints" / "step-00000006.safetensors"
    data = newest.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    def value_of(key: bytes) -> int:  # the first byte of a value in the state (a JSON string in the header)
        return 8 + header.index(b'\\"' + key + b'\\": ') + len(key) + 5

    places = [0, 3, value_of(b"step"), value_of(b"ema_updates"), value_of(b"lr"), 8 + n // 2, 8 + n + 5,
              len(data) - 1]
    spec = load_spec(finished / "spec.toml")
    for i, at in enumerate(places):
        run_dir = tmp_path / f"copy{i}"
        shutil.copytree(finished, run_dir)
        damaged = bytearray(data)
        damaged[at] ^= 0x04
        (run_dir / "checkpoints" / newest.name).write_bytes(bytes(damaged))
        step, warnings = resumed_from(run_dir, spec)
        assert step == 3, at
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: {run_dir / 'checkpoints' / newest.name}: ")
        assert warnings[0].endswith("; skipped for the previous checkpoint")


def test_inconsistent_foreign_and_special_files_are_skipped(finished, tiny_spec, tmp_path):
    ckpt = finished / "checkpoints"
    spec = load_spec(finished / "spec.toml")
    # another run's checkpoint (another seed) under this run's newest name
    other = tmp_path / "other"
    other.mkdir()
    train(compile_spec(load_spec(tiny_spec(), ["train.seed=8", "eval.plot=false", 'eval.metrics=["energy"]'])), other)
    shutil.copy(other / "checkpoints" / "step-00000006.safetensors", ckpt / "step-00000006.safetensors")
    limit = 1 << 30
    with pytest.raises(UserError, match="belongs to another run"):
        checkpoint.read(ckpt / "step-00000006.safetensors", limit, checkpoint.spec_id(spec))
    # a checkpoint renamed to a later step
    shutil.copy(ckpt / "step-00000003.safetensors", ckpt / "step-00000009.safetensors")
    with pytest.raises(UserError, match="inconsistent: its step 3 is not the one in its name"):
        checkpoint.read(ckpt / "step-00000009.safetensors", limit)
    # a link to a device: refused without reading
    os.symlink("/dev/zero", ckpt / "step-00000012.safetensors")
    with pytest.raises(UserError, match="symbolic link"):
        checkpoint.read(ckpt / "step-00000012.safetensors", limit)
    with pytest.raises(UserError, match="more than it can hold"):
        checkpoint.read(ckpt / "step-00000003.safetensors", 100)
    (ckpt / "latest").write_text("step-00000012\n")
    step, warnings = resumed_from(finished, spec)
    assert step == 3 and len(warnings) == 3


def test_resume_with_another_process_count_is_refused(finished, tmp_path):
    """Where the run's steps drew random numbers during the loss (they depend on the split over
    processes), or its checkpoint predates the shared streams (tests/test_parallel.py: the resumes
    that are allowed)."""
    path = finished / "checkpoints" / "step-00000006.safetensors"
    original = checkpoint.read(path, 1 << 30)
    assert original.state["split_free"] is True and original.state["streams"] == "global"
    for change, why in (({"split_free": False}, "its steps drew random numbers that depend on the split over "
                                               "processes (a residual's or dropout's)"),
                        ({"streams": None}, "it was written before streams shared by all processes")):
        state = {**original.state, "world_size": 2, **change}
        head, data, _ = checkpoint.encode(original.tensors, state)
        path.write_bytes(head + bytes(data))
        with pytest.raises(UserError) as info:
            resumed_from(finished, load_spec(finished / "spec.toml"))
        assert info.value.lines == [f"{finished}: trained with 2 processes, resumed with 1: {why}, so the result "
                                    "would differ; resume with --nproc 2"]


# -- teachers -------------------------------------------------------------------------------------

def student_spec(folder: Path, teacher: str) -> Path:
    from tests.conftest import TINY

    path = folder / "student.toml"
    text = TINY.format(characterization="progressive").replace(
        "[train]", f'[teacher]\nkind = "run"\npath = "{teacher}"\n\n[train]')
    path.write_text(text.replace("[eval]", "[eval]\nplot = false").replace(
        'characterization = "progressive"', 'characterization = "progressive"\ntarget = "teacher"'))
    return path


def test_teacher_path_is_relative_to_the_spec_and_pinned(finished, tmp_path, main, monkeypatch):
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = student_spec(specs, "../run")
    monkeypatch.chdir(specs.parent.parent)  # the working directory plays no part
    assert load_spec(spec).teacher.path == str(finished)
    student = tmp_path / "student"
    code, _, err = main("run", spec, "--out", student)
    assert code == 0, err
    pin = checkpoint.read(student / "checkpoints" / "step-00000006.safetensors", 1 << 30).state["teacher"]
    assert pin["run"] == str(finished) and pin["checkpoint"] == "step-00000006.safetensors"
    # the teacher trains further: the student may not continue against another teacher
    code, _, err = main("run", "--resume", finished, "--set", "train.steps=9")
    assert code == 0, err
    code, _, err = main("run", "--resume", student, "--set", "train.steps=9")
    assert code == 2 and err.strip().startswith("teacher.path: the teacher changed since step-00000006.safetensors")


def test_a_run_cannot_teach_itself(finished, tmp_path, main):
    (finished / "spec.toml").write_text((finished / "spec.toml").read_text().replace(
        "[train]", f'[teacher]\nkind = "run"\npath = "{finished}"\n\n[train]'))
    code, _, err = main("run", "--resume", finished)
    assert code == 2 and err.strip().endswith(f"teacher.path: {finished}: is this run's own folder "
                                              "(a run cannot teach itself)")


# -- end files --------------------------------------------------------------------------------------

def test_end_files_are_strict_json_and_atomic(finished, tmp_path):
    from flowspec import atomic

    assert atomic.dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    for line in (finished / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    json.loads((finished / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert not [p for p in finished.rglob(".*") if p.name != runfolder.LOCK]  # no temporaries

    def fail(p):
        p.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    target = tmp_path / "steps-1.npy"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="No space left on device"):
        atomic.atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".steps-1.npy.*"))


# -- Ctrl-C (real processes) ----------------------------------------------------------------------------

@pytest.mark.parametrize("wait_for_training", [False, True])
def test_a_double_ctrl_c_is_one_line_and_exit_130(tiny_spec, tmp_path, wait_for_training):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "flowspec", "run", tiny_spec(), "--out", run_dir,
                             "--set", "train.steps=1000000", "--set", "network.width=256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # as from a terminal (a background job inherits SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if wait_for_training:  # a second Ctrl-C in the middle of training
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    else:  # while torch loads
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    if wait_for_training:
        assert len(lines) == 2, err  # the run's first line, then one line
        # the second Ctrl-C interrupts the step at once, unless a step ended between the two:
        # then the first one's stop at that step, with its checkpoint (the second is ignored)
        import re

        stopped = re.fullmatch(rf"SIGINT: stopped at step (\d+) with a checkpoint; resume with: "
                               rf"flowspec run --resume {re.escape(str(run_dir))}", lines[-1])
        assert lines[-1] == "flowspec: interrupted" or stopped, err
        if stopped:
            assert (run_dir / "checkpoints" / f"step-{int(stopped[1]):08d}.safetensors").is_file()
    else:  # before training, every Ctrl-C stops at once
        assert lines[-1] == "flowspec: interrupted" and len(lines) <= 2, err


# slow (four processes, ~10 s): the default tier keeps tests/test_resume.py's SIGKILL-then-resume
@pytest.mark.slow
def test_a_kill_storm_right_after_checkpoints_resumes_bit_identical(tmp_path):
    """kill -9 a few milliseconds after each of several checkpoint commits (the moments a two-file
    checkpoint could be left half-written), resume each time: the end is the uninterrupted run."""
    import random
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from tests.test_resume import LONG, training_records

    steps = 16
    spec = tmp_path / "long.toml"
    spec.write_text(LONG.format(steps=steps).replace("checkpoint_every = 2", "checkpoint_every = 1"))
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    train(compile_spec(load_spec(spec)), reference)

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "flowspec", "run", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def newest():
        return checkpoint.stems(run_dir / "checkpoints")[:1]

    rng, proc, kills = random.Random(3), start(spec, "--out", run_dir), 0
    while kills < 3:
        seen, deadline = newest(), time.monotonic() + 120
        while newest() == seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.01))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        proc = start("--resume", run_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert kills == 3
    name = f"step-{steps:08d}.safetensors"
    a, b = load_file(str(run_dir / "checkpoints" / name)), load_file(str(reference / "checkpoints" / name))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert training_records(run_dir) == training_records(reference)
