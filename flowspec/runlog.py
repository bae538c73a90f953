"""What a run writes into its folder besides checkpoints: ``spec.toml`` (the resolved spec),
``environment.json``, ``metrics.jsonl`` (one JSON object per logged step, one per evaluation, the
final evaluation last), ``eval.json`` (metric by K at the end) and the plots ``loss.png`` and
``nfe.png`` (flowspec.plots); each record also goes to the trackers of ``[log] backends``
(flowspec.tracking). Only rank 0 writes.

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

from flowspec import atomic, plots
from flowspec.engine import TrainingGraph
from flowspec.errors import UserError
from flowspec.spec import to_toml
from flowspec.tracking import Trackers


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
    evaluation into metrics.jsonl and eval.json, draws the plots and hands both to the trackers. A
    context manager: the log and the trackers are closed however the run ends."""

    def __init__(self, graph: TrainingGraph, run_dir: Path | None, resumed: bool = False):
        self.path: Path | None = None
        self._file: TextIO | None = None
        self.trackers: Trackers | None = None
        if run_dir is None:
            return
        self.path = path = run_dir / "metrics.jsonl"
        atomic.atomic_text(run_dir / "spec.toml", to_toml(graph.spec))
        if not resumed or not (run_dir / "environment.json").exists():
            atomic.atomic_text(run_dir / "environment.json", json.dumps(environment(graph), indent=1))
        if graph.spec.log.backends:  # before metrics.jsonl: a run whose tracker cannot start never began
            self.trackers = Trackers(graph.spec, run_dir, resumed, graph.step_count)
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
        if self.trackers is not None:
            self.trackers.log(record)

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
        result = {"step": graph.step_count, "num_samples": ev.num_samples, "metrics": list(graph.metrics),
                  "steps": results, **extras}
        run_dir = self.path.parent
        atomic.atomic_text(run_dir / "eval.json", atomic.dumps(result, indent=1))
        if ev.plot:
            try:
                plots.run_plots(run_dir, graph.spec.name)
            except Exception as exc:  # a picture that cannot be drawn must not fail a finished run
                sys.stderr.write(f"warning: {run_dir}: the plots could not be drawn ({type(exc).__name__}: {exc})\n")
        if self.trackers is not None:
            self.trackers.log(record)
            files = [run_dir / "eval.json", run_dir / "loss.png", run_dir / "nfe.png",
                     *sorted((run_dir / "samples").glob("*.png"))]
            self.trackers.finish(graph.step_count, files, result)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close()
        if self.trackers is not None:
            stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, UserError) and exc.exit_code > 128)
            self.trackers.close("finished" if exc is None else "killed" if stopped else "failed")
            self.trackers = None
