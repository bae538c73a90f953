"""Data parallelism over torch.distributed with the gloo backend on the CPU, through the command line:
`flowspec run --nproc 2` writes one run folder (rank 0), evaluates sharded, and resumes (the steps
themselves against one process: tests/test_parallel.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowspec.compile import compile_spec
from flowspec.spec import validate

SPECS = Path(__file__).resolve().parent.parent / "specs"
DRAWN = "its steps drew random numbers that depend on the split over processes (a residual's or dropout's)"

SPEC = {"data": {"kind": "digits"}, "interpolant": {"kind": "linear", "base_scale": 0.5},
        "network": {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                    "attention_resolutions": [4], "channels_per_head": 4, "embedding_dim": 8},
        "objective": {"characterization": "lagrangian", "diagonal_fraction": 0.5},
        "train": {"steps": 1, "batch_size": 8, "precision": "float64", "lr": 1e-2, "ema": 0.0},
        "eval": {"metrics": [], "num_samples": 4, "steps": [1]}}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "flowspec", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# slow (two torchrun launches of a U-Net, ~17 s): the default tier keeps the lockstep step of two
# gloo processes above and the launcher's refusal of a mismatched resume below
@pytest.mark.slow
def test_flowspec_run_nproc_2_writes_one_folder_evaluates_sharded_and_resumes(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        '[data]\nkind = "digits"\n[interpolant]\nkind = "linear"\nbase_scale = 0.5\n'
        '[network]\nkind = "unet"\nchannels = 8\nchannel_mult = [1, 2]\nnum_blocks = 1\n'
        'attention_resolutions = [4]\nchannels_per_head = 4\nembedding_dim = 8\n'
        '[objective]\ncharacterization = "lagrangian"\n'
        '[train]\nsteps = 2\nbatch_size = 8\ncheckpoint_every = 1\nlog_every = 1\nprecision = "float64"\n'
        '[eval]\nmetrics = ["digits_fd"]\nnum_samples = 11\nsteps = [1, 2]\n')
    run_dir = tmp_path / "run"
    first = _run(["run", str(spec), "--nproc", "2", "--out", str(run_dir)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip().splitlines()[-1] == str(run_dir)  # printed once, by rank 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2]  # one writer
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 2
    ckpt = load_file(str(run_dir / "checkpoints" / "step-00000002.safetensors"))
    # one data and batch stream for both ranks; each its own local stream
    assert "rng.local.rank1" in ckpt and not torch.equal(ckpt["rng.local.rank0"], ckpt["rng.local.rank1"])
    # sharded evaluation: rank 0 gathered all 11 samples, equal to sampling the EMA in one process
    samples = np.load(run_dir / "samples" / "steps-2.npy")
    assert samples.shape == (11, 1, 8, 8)
    assert (run_dir / "samples" / "steps-2.png").stat().st_size > 0  # the image grid
    from flowspec import checkpoint
    from flowspec.evaluate import base_samples, sample

    graph = compile_spec(validate({**SPEC, "train": {**SPEC["train"], "steps": 2}}))
    graph.ema.model.load_state_dict({k[4:]: v for k, v in ckpt.items() if k.startswith("ema.")})
    x = sample(graph.sampler(), base_samples(graph, 11, graph.spec.eval.seed), 2)
    assert np.allclose(samples, x.numpy(), atol=1e-6)
    assert json.loads((run_dir / "eval.json").read_text())["steps"]["2"]["digits_fd"] > 0
    # resume both ranks from the checkpoint and continue to step 3
    again = _run(["run", "--resume", str(run_dir), "--nproc", "2", "--set", "train.steps=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3]
    assert checkpoint.pointer(run_dir / "checkpoints") == "step-00000003"


# slow (three launches, one of which starts torchrun, ~9 s): the default tier keeps the resume check
# before any process starts, below
@pytest.mark.slow
def test_nproc_bad_input_is_one_line_before_any_process_starts(tmp_path):
    """Spec, override, run-folder and resume mistakes fail in the launching process, one line each,
    with no torchrun report; a rank that fails later is summed up in one line, not a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nkind = "checkerbord"\n[objective]\ncharacterization = "lagrangian"\n')
    r = _run(["run", str(bad), "--nproc", "2"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"{bad}: data.kind: unknown name 'checkerbord' (known: ")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    r = _run(["run", str(SPECS / "checkerboard-lsd.toml"), "--nproc", "2", "--out", str(taken)], tmp_path)
    assert (r.returncode, r.stderr) == (
        2, f"{taken}: run folder exists (use --force to overwrite, or --out for another)\n")
    # a rank fails: its one line (torchrun may stop the other rank before it prints), then one summary
    spec = tmp_path / "mnist.toml"
    spec.write_text((SPECS / "digits-lsd.toml").read_text().replace('kind = "digits"', 'kind = "mnist"'))
    r = _run(["run", str(spec), "--nproc", "2", "--set", f'data.root="{tmp_path}"', "--set", 'eval.metrics=["energy"]',
              "--out", str(tmp_path / "m")], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if f"{spec}: data.root: MNIST" in line]
    assert lines and all(line.startswith(str(spec)) and line.endswith("or set data.root to its folder)")
                         for line in lines)  # whole lines, however many ranks got to print theirs
    assert r.stderr.splitlines()[-1] in [f"run --nproc 2: rank {k} failed first (exit status 2); its error is above"
                                         for k in (0, 1)]
    assert not (tmp_path / "m").exists()


def test_nproc_resume_checks_the_spec_before_any_process_starts(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.toml").write_text((SPECS / "checkerboard-lsd.toml").read_text())
    r = _run(["run", "--resume", str(run_dir), "--set", "eval.num_samples=5", "--nproc", "2"], tmp_path)
    assert (r.returncode, r.stderr) == (2, f"--set: differs from the run's spec {run_dir / 'spec.toml'} in "
                                           "eval.num_samples (only train.steps and [log] may change on resume)\n")


def test_ranks_end_with_a_killed_launcher_and_another_process_count_is_refused(tmp_path, main):
    """kill -9 of the `--nproc 2` launcher: both ranks stop (with a checkpoint) instead of training
    on; resuming that run with one process, or a one-process run with two, is refused in one line
    where the steps drew random numbers during the loss (PSD-U's split points)."""
    import signal
    import time

    spec = tmp_path / "long.toml"
    # PSD-U: its residual draws random numbers (split points), which depend on the split over processes
    spec.write_text('[data]\nkind = "checkerboard"\n[network]\nkind = "mlp"\nwidth = 16\ndepth = 1\n'
                    '[objective]\ncharacterization = "progressive"\n'
                    '[train]\nsteps = 1000000\nbatch_size = 8\ncheckpoint_every = 50\ndevice = "cpu"\n'
                    '[eval]\nmetrics = []\nnum_samples = 4\nsteps = [1]\n')
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "flowspec", "run", str(spec), "--nproc", "2",
                                 "--out", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (not list((run_dir / "checkpoints").glob("*.safetensors")) and launcher.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.2)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(ranks) == 2, launcher.stderr.read() if launcher.poll() is not None else ranks
    launcher.kill()
    launcher.wait()

    def alive(pid: int) -> bool:
        """False once the process has ended: gone, or a zombie whose other threads have ended too
        (the leader of a threaded process turns zombie first; its files, the run folder's lock
        among them, close when the last thread ends)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split(")")[-1].split()[0] == "Z"
            return not zombie or len(os.listdir(f"/proc/{pid}/task")) > 1
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 60
    while any(alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in ranks)
    assert launcher.returncode == -signal.SIGKILL
    code, _, err = main("run", "--resume", run_dir)
    assert (code, err.strip()) == (2, f"{run_dir}: trained with 2 processes, resumed with 1: {DRAWN}, so the "
                                      "result would differ; resume with --nproc 2")
    # a one-process run resumed with two processes: refused by the launcher, before any rank starts
    single = tmp_path / "single"
    code, _, err = main("run", spec, "--out", single, "--set", "train.steps=2", "--set", "train.checkpoint_every=1")
    assert code == 0, err
    code, _, err = main("run", "--resume", single, "--nproc", "2")
    assert (code, err.strip()) == (2, f"{single}: trained with 1 process, resumed with 2: {DRAWN}, so the "
                                      "result would differ; resume with one process (no --nproc)")


def test_nproc_2_with_grad_accum_2_resumes_in_one_process_as_one_process_trains(tmp_path, main):
    """Two processes of two micro-batches each, checkpointed at step 2, continued to step 4 in one
    process: the same weights (float64, to rounding) as one process training four steps; the data
    streams are those of one process, so nothing but the sums' order differs."""
    spec = tmp_path / "accum.toml"
    spec.write_text('[data]\nkind = "checkerboard"\n[network]\nkind = "mlp"\nwidth = 16\ndepth = 2\n'
                    '[objective]\ncharacterization = "lagrangian"\n'
                    '[train]\nsteps = 2\nbatch_size = 16\ngrad_accum = 2\ncheckpoint_every = 1\nlog_every = 1\n'
                    'precision = "float64"\ndevice = "cpu"\nlr = 0.01\n'
                    '[eval]\nmetrics = []\nnum_samples = 8\nsteps = [1]\nplot = false\nflow_map_error = false\n')
    run_dir, alone = tmp_path / "run", tmp_path / "alone"
    first = _run(["run", str(spec), "--nproc", "2", "--out", str(run_dir)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 2
    code, _, err = main("run", "--resume", run_dir, "--set", "train.steps=4")
    assert code == 0, err
    code, _, err = main("run", spec, "--out", alone, "--set", "train.steps=4")
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3, 4]
    resumed, reference = (load_file(str(d / "checkpoints" / "step-00000004.safetensors")) for d in (run_dir, alone))
    weights = [k for k in reference if k.startswith(("model.", "ema."))]
    assert weights and max(float((resumed[k] - reference[k]).abs().max()) for k in weights) < 1e-12
    assert torch.equal(resumed["rng.data"], reference["rng.data"])  # the same samples were drawn
    assert torch.equal(resumed["rng.train"], reference["rng.train"])
