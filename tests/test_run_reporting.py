"""What a run tells its user: a name that carries the method when --set changes it, progress lines
with an ETA off a terminal, `elapsed` that continues across a resume, the evaluation's size before it
starts, and the CPU thread count with a warning on an oversubscribed machine."""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from flowspec import threads
from flowspec.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
LSD = ROOT / "specs" / "checkerboard-lsd.toml"
train_module = importlib.import_module("flowspec.train")  # (flowspec.train is the function)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# -- run names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, name", [
    ([], "checkerboard-lsd"),
    (["train.steps=10"], "checkerboard-lsd"),
    (["objective.characterization=lagrangian"], "checkerboard-lsd"),  # the same method: no suffix
    (["objective.characterization=eulerian"], "checkerboard-lsd+esd"),
    (["objective.characterization=progressive", 'objective.gamma="half"'], "checkerboard-lsd+psd-m"),
    (["objective.characterization=flow_matching"], "checkerboard-lsd+flow-matching"),
    (["objective.target=teacher", "teacher.kind=analytic"], "checkerboard-lsd+lmd"),
    (["objective.characterization=eulerian", "name=mine"], "mine"),  # a name set by hand is kept
])
def test_run_names_carry_the_method_an_override_changes(overrides, name):
    assert load_spec(LSD, overrides).name == name


def test_an_explicit_spec_name_gets_the_method_too(tiny_spec):
    assert load_spec(tiny_spec("lagrangian"), ["objective.characterization=eulerian"]).name == "tiny+esd"
    assert load_spec(tiny_spec("progressive"), ['objective.gamma="half"']).name == "tiny+psd-m"


# -- one run through the command line --------------------------------------------------------------

def test_a_run_names_itself_reports_progress_and_the_evaluation_size(tiny_spec, tmp_path, main, monkeypatch,
                                                                      restore_threads):
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)  # a line at every logged step
    # an oversubscribed 2-core machine, and torch's default of 2 threads
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    for key in threads.CHOSEN:
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(2)
    runs = tmp_path / "runs"
    code, out, err = main("run", tiny_spec("lagrangian"), "--runs-dir", runs,
                          "--set", "objective.characterization=eulerian")
    assert code == 0, err
    (folder,) = runs.iterdir()
    assert folder.name.startswith("tiny+esd-") and out.strip() == str(folder)
    assert 'name = "tiny+esd"' in (folder / "spec.toml").read_text()
    lines = err.splitlines()
    # the oversubscribed machine: one warning line, before training
    warnings = [line for line in lines if line.startswith("warning: the CPU is oversubscribed")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: the CPU is oversubscribed (load average 64.0 on 2 cores): training with 2 threads")
    # off a terminal: time elapsed, and the time left until the last step
    progress = [line for line in lines if line.startswith("tiny+esd: step ")]
    assert [line.split(",")[0] for line in progress] == ["tiny+esd: step 2/6", "tiny+esd: step 4/6",
                                                         "tiny+esd: step 6/6"]
    assert all(re.fullmatch(r"tiny\+esd: step [24]/6, loss [\d.]+, [\d.]+ it/s, \d+ s elapsed, ETA \d+ s", line)
               for line in progress[:2]), progress
    assert re.fullmatch(r"tiny\+esd: step 6/6, loss [\d.]+, [\d.]+ it/s, \d+ s elapsed", progress[2])
    # the evaluation's size, before its table
    size = ("tiny+esd: evaluating 2 K values (1, 2) x 400 samples = 1,200 flow-map passes + the flow-map error "
            "(200 samples per pair of a 5-point (s, t) grid, dopri5); metrics kl, energy")
    assert size in lines and lines.index(size) > lines.index(progress[2])
    assert lines.index(size) < next(i for i, line in enumerate(lines) if "EMA flow map after 6 steps" in line)


def test_duration():
    assert [train_module.duration(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_the_evaluation_size_names_ode_rows(tiny_spec):
    from flowspec.compile import compile_spec

    spec = load_spec(tiny_spec(), ['eval.ode=[{solver = "euler", steps = 4}, {solver = "dopri5"}]',
                                   "eval.flow_map_error=false", "eval.steps=[1]"])
    line = train_module.evaluation_size(compile_spec(spec))
    assert line.startswith("tiny: evaluating 1 K value (1) x 400 samples = 400 flow-map passes "
                           "+ 2 ODE rows (euler K=4, ")
    assert line.endswith(" on 400 samples; metrics kl, energy") and "flow-map error" not in line


# -- elapsed across a resume -----------------------------------------------------------------------

def test_elapsed_continues_across_resume(tiny_spec, tmp_path, main, restore_threads):
    spec = tiny_spec("lagrangian")
    run = tmp_path / "run"
    code, _, err = main("run", spec, "--out", run, "--set", "train.steps=4")
    assert code == 0, err
    # as if the first 4 steps had taken 1000 s
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if "elapsed" in r:
            r["elapsed"] = 500.0 * r["step"] / 2
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert train_module.logged_elapsed(run) == 1000.0
    code, _, err = main("run", "--resume", run, "--set", "train.steps=6")
    assert code == 0, err
    after = [json.loads(line) for line in path.read_text().splitlines()]
    elapsed = [r["elapsed"] for r in after if "elapsed" in r]
    assert [r["step"] for r in after if "elapsed" in r] == [2, 4, 6]
    assert elapsed[:2] == [500.0, 1000.0] and 1000.0 < elapsed[2] < 1000.0 + 600


def test_logged_elapsed_of_a_folder_without_a_log(tmp_path):
    assert train_module.logged_elapsed(tmp_path) == 0.0
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "elapsed": 3.5}\nnot json\n{"step": 3, "eval": {}}\n')
    assert train_module.logged_elapsed(tmp_path) == 3.5


# -- threads ---------------------------------------------------------------------------------------

def test_threads_are_capped_at_the_cores_unless_chosen():
    assert threads.choose(4, 2, 0.1, {}) == (2, None)
    assert threads.choose(1, 8, 0.1, {}) == (1, None)  # never more than torch's count
    assert threads.choose(4, 2, 0.1, {"OMP_NUM_THREADS": "4"}) == (4, None)


def test_an_oversubscribed_cpu_is_one_warning_line():
    n, warning = threads.choose(2, 2, 5.0, {})
    assert n == 2 and warning == ("warning: the CPU is oversubscribed (load average 5.0 on 2 cores): training with "
                                  "2 threads can run several times slower than with one; OMP_NUM_THREADS=1 often "
                                  "runs faster on a shared CPU")
    assert threads.choose(4, 3, 3.5, {"OMP_NUM_THREADS": "4"})[1].startswith(
        "warning: the CPU is oversubscribed (load average 3.5 on 3 cores): training with 4 threads")
    # one thread: nothing to change, nothing said
    assert threads.choose(1, 1, 1.5, {"OMP_NUM_THREADS": "1"}) == (1, None)
    assert threads.choose(2, 2, 2.0, {})[1] is None and threads.choose(2, 2, None, {})[1] is None


@pytest.mark.parametrize("text, cores", [("max 100000", None), ("200000 100000", 2), ("150000 100000", 1),
                                          ("50000 100000", 1), ("garbage", None), ("1 0", None)])
def test_cgroup_quota(tmp_path, text, cores):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert threads.quota(tmp_path / "cpu.max") == cores
    assert threads.quota(tmp_path / "absent") is None


def test_configure_sets_torch_and_warns(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    for key in threads.CHOSEN:
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(2)
    seen: list[str] = []
    assert threads.configure(seen.append) == 1 == torch.get_num_threads()  # capped, hence no warning
    assert seen == []
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.configure(seen.append) == 1  # never raised back
    torch.set_num_threads(2)
    assert threads.configure(seen.append) == 2
    assert len(seen) == 1 and seen[0].startswith("warning: the CPU is oversubscribed (load average 99.0 on 2 cores)")
    assert 1 <= threads.available_cores() <= (os.cpu_count() or 1)
