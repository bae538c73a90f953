"""The training loop: run folder, logging, progress, checkpoints and evaluation (DESIGN.md, "train").

Run folder ``runs/<name>-<timestamp>/``: ``spec.toml`` (resolved), ``environment.json``,
``metrics.jsonl`` (one JSON object per logged step, and one per evaluation), ``checkpoints/``,
``samples/steps-K.{png,npy}`` and ``eval.json`` (metric by K at the end).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowspec import checkpoint
from flowspec.compile import TrainingGraph
from flowspec.errors import UserError
from flowspec.evaluate import evaluate, evaluate_baselines
from flowspec.spec import to_toml


def environment(graph: TrainingGraph) -> dict:
    from importlib.metadata import version

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "flowspec": version("flowspec"),
           "device": str(graph.device), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "seed": graph.spec.train.seed,
           "started": dt.datetime.now().isoformat(timespec="seconds")}
    if graph.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(graph.device)
        env["cuda"] = torch.version.cuda
    return env


def make_run_dir(name: str, runs_dir: Path = Path("runs"), out: Path | None = None, force: bool = False) -> Path:
    """Create the run folder; an existing one is refused unless ``force`` (then it is emptied)."""
    path = out if out is not None else runs_dir / f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if path.exists() and any(path.iterdir()):
        if not force:
            raise UserError(f"{path}: run folder exists (use --force to overwrite, or --out for another)")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{path}: cannot write the run folder: {exc.strerror or exc}", exit_code=1) from None
    return path


def results_table(results: dict[str, dict[str, float]], title: str) -> Table:
    """One row per sampler (flow-map K, or an ODE baseline): metrics, NFE, seconds."""
    names = [n for n in next(iter(results.values())) if n not in ("seconds", "nfe")]
    table = Table(title=title)
    table.add_column("steps", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("NFE", justify="right")
    table.add_column("sampling s", justify="right")
    for k, row in results.items():
        table.add_row(k, *(f"{row[n]:.4f}" if n in row else "-" for n in names),
                      str(row.get("nfe", "-")), f"{row['seconds']:.2f}")
    return table


def train(graph: TrainingGraph, run_dir: Path, console: Console | None = None) -> dict:
    """Train for ``spec.train.steps`` steps, evaluate, and return the final metric by K."""
    console = console or Console(stderr=True)
    spec = graph.spec
    o, ev = spec.train, spec.eval
    checkpoint.atomic_text(run_dir / "spec.toml", to_toml(spec))
    checkpoint.atomic_text(run_dir / "environment.json", json.dumps(environment(graph), indent=1))
    log = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not console.is_terminal)
    try:
        with progress:
            task = progress.add_task(spec.name, total=o.steps, completed=graph.step_count, loss="-", rate="-")
            window_start, window_steps, t0 = time.perf_counter(), 0, time.perf_counter()
            while graph.step_count < o.steps:
                out = graph.step()
                window_steps += 1
                k = graph.step_count
                if k % o.log_every == 0 or k == o.steps:
                    now = time.perf_counter()
                    rate = window_steps / (now - window_start)
                    record = {"step": k, **{n: float(v) for n, v in out.logs.items()},
                              "lr": graph.optimizer.param_groups[0]["lr"],
                              "grad_norm": float(graph.last_grad_norm), "steps_per_sec": rate,
                              "elapsed": now - t0}
                    if not math.isfinite(record["loss"]):
                        raise UserError(f"step {k}: loss is {record['loss']} (non-finite); "
                                        f"the last good checkpoint is kept", exit_code=1)
                    write(record)
                    progress.update(task, loss=f"{record['loss']:.4f}", rate=f"{rate:.1f}")
                    window_start, window_steps = now, 0
                progress.update(task, completed=k)
                if o.checkpoint_every and k % o.checkpoint_every == 0 and k < o.steps:
                    checkpoint.save(graph, run_dir)
                if ev.every and k % ev.every == 0 and k < o.steps:
                    write({"step": k, "eval": evaluate(graph)})
        checkpoint.save(graph, run_dir)
        results = evaluate(graph, run_dir)
        extras = evaluate_baselines(graph, run_dir)
        write({"step": graph.step_count, "eval": results, **extras})
        checkpoint.atomic_text(run_dir / "eval.json", json.dumps(
            {"step": graph.step_count, "num_samples": ev.num_samples, "metrics": list(graph.metrics),
             "steps": results, **extras}, indent=1))
    finally:
        log.close()
    console.print(results_table({**results, **extras.get("ode", {})},
                                f"{spec.name}: EMA flow map after {graph.step_count} steps"))
    if "flow_map_error" in extras:
        fme = extras["flow_map_error"]
        console.print(f"flow_map_error (MSE against the true map): (s, t) grid {fme['grid']:.4g}, "
                      f"(0, 1) {fme['0-1']:.4g}")
    return results
