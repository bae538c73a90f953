"""Shared fixtures: a tiny spec that trains in about a second on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flowspec.flowmap import FlowMap
from flowspec.networks.mlp import MLP, MLPOptions


def pytest_configure(config: pytest.Config) -> None:
    """One thread in this process and in the processes the tests start (unless OMP_NUM_THREADS says
    otherwise), as the CPU benchmarks run: on a shared 2-core machine more threads are slower, and a
    run with several threads on a busy machine adds a warning line (flowspec.threads) that the tests
    comparing stderr line by line would meet."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = """
name = "tiny"

[data]
kind = "checkerboard"

[interpolant]
kind = "linear"
base_scale = "data_std"

[network]
kind = "mlp"
width = 32
depth = 2

[objective]
characterization = "{characterization}"

[train]
steps = 6
batch_size = 64
log_every = 2
checkpoint_every = 3
seed = 7
device = "cpu"

[eval]
steps = [1, 2]
num_samples = 400
"""


@pytest.fixture
def tiny_spec(tmp_path: Path):
    """Write a tiny spec for a characterization and return its path."""

    def make(characterization: str = "lagrangian", extra: str = "") -> Path:
        path = tmp_path / f"tiny-{characterization}.toml"
        text = TINY.format(characterization=characterization)
        path.write_text(text.replace("[train]", extra + "\n[train]") if extra else text)
        return path

    return make


@pytest.fixture
def mlp_map():
    """A float64 flow map on a small MLP (2-D data), seeded."""
    torch.manual_seed(0)
    return FlowMap(MLP(MLPOptions(width=32, depth=2), (2,))).to(torch.float64)


def _exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def invoke(*args) -> tuple[int, str, str]:
    """The console entry point in this process, for fixtures wider than one test (which cannot use
    ``main``): ``invoke(*args) -> (exit code, stdout, stderr)``, captured the same way."""
    import contextlib
    import io
    import sys

    from flowspec.cli import main as entry

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["flowspec", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry()
                code = 0
            except SystemExit as exc:
                code = _exit_code(exc)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def main(capsys, monkeypatch):
    """Run the console entry point in this process: ``main(*args) -> (exit code, stdout, stderr)``.

    Much faster than a subprocess (no interpreter or torch start-up); the exit path is the same
    :func:`flowspec.cli.main`, so one-line errors and exit codes are exactly what a user sees."""
    import sys

    from flowspec.cli import main as entry

    def call(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["flowspec", *map(str, args)])
        capsys.readouterr()
        try:
            entry()
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call
