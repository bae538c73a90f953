"""What a run writes into its folder besides checkpoints: ``spec.toml`` (the resolved spec),
``environment.json``, ``metrics.jsonl`` (one JSON object per logged step, one per evaluation, the
final evaluation last) and ``eval.json`` (metric by K at the end). Only rank 0 writes.

Every file is written whole (atomic rename), except metrics.jsonl, which is appended line by line
and flushed; its final record rewrites the whole file at once, so that a full disk cuts no line.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import TextIO

import torch

from flowspec import atomic
from flowspec.engine import TrainingGraph
from flowspec.errors import UserError
from flowspec.spec import to_toml


def environment(graph: TrainingGraph) -> dict:
    """Versions, device, threads, seed and start time of a run (``environment.json``)."""
    from importlib.metadata import version

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "flowspec": version("flowspec"),
           "device": str(graph.device), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "seed": graph.spec.train.seed,
           "started": dt.datetime.now().isoformat(timespec="seconds")}
    if graph.dist.enabled:
        env["world_size"] = graph.dist.world_size
    if graph.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(graph.device)
        env["cuda"] = torch.version.cuda
    return env


def finite(value: float) -> float | None:
    """JSON has no NaN or infinity: non-finite numbers are logged as null."""
    return value if math.isfinite(value) else None


def truncate_metrics(run_dir: Path, step: int, final: bool) -> None:
    """Make metrics.jsonl read like an uninterrupted run that reached ``step``: drop records after it,
    a partly written last line, and (when ``final``) the end-of-run evaluation at ``step``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            k = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if k < step or (k == step and not (final and "eval" in record)):
            kept.append(line + "\n")
    atomic.atomic_text(path, "".join(kept))


class RunLog:
    """The run folder's files, on rank 0 (``run_dir`` None: another rank, which writes nothing).

    Opening writes spec.toml and (unless resuming a run that has it) environment.json and opens
    metrics.jsonl for appending; :meth:`write` appends a record, :meth:`finish` writes the final
    evaluation into metrics.jsonl and eval.json. A context manager: the log is closed however the
    run ends."""

    def __init__(self, graph: TrainingGraph, run_dir: Path | None, resumed: bool = False):
        self.path: Path | None = None
        self._file: TextIO | None = None
        if run_dir is None:
            return
        self.path = path = run_dir / "metrics.jsonl"
        atomic.atomic_text(run_dir / "spec.toml", to_toml(graph.spec))
        if not resumed or not (run_dir / "environment.json").exists():
            atomic.atomic_text(run_dir / "environment.json", json.dumps(environment(graph), indent=1))
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> UserError:
        return UserError(f"{self.path}: cannot write: {exc.strerror or exc}", exit_code=1)

    def write(self, record: dict) -> None:
        """Append one record (one line of JSON) and flush it."""
        if self._file is None:
            return
        try:
            self._file.write(atomic.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise self._unwritable(exc) from None

    def finish(self, graph: TrainingGraph, results: dict, extras: dict) -> None:
        """The final record: metrics.jsonl rewritten at once with it, and eval.json."""
        if self.path is None:
            return
        self.close()
        kept = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        kept += "\n" if kept and not kept.endswith("\n") else ""
        record = {"step": graph.step_count, "eval": results, **extras}
        atomic.atomic_text(self.path, kept + atomic.dumps(record) + "\n")
        ev = graph.spec.eval
        atomic.atomic_text(self.path.parent / "eval.json", atomic.dumps(
            {"step": graph.step_count, "num_samples": ev.num_samples, "metrics": list(graph.metrics),
             "steps": results, **extras}, indent=1))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
