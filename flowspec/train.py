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
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowspec import atomic, checkpoint, distributed, engine, runfolder
from flowspec.engine import TrainingGraph
from flowspec.errors import UserError
from flowspec.evaluate import evaluate, evaluate_baselines
from flowspec.runfolder import make as make_run_dir, refuse_existing  # noqa: F401 (the CLI's names)
from flowspec.runs import RunFolder
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


class SignalStop:
    """While active, SIGINT and SIGTERM only raise a flag, read at the next step boundary; a second
    signal of the same kind acts as usual (so a stuck step can still be interrupted)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, self._again if previous is signal.default_int_handler else previous)

    @staticmethod
    def _again(signum: int, frame) -> None:
        """A second Ctrl-C: interrupt now, and ignore any further one while the process exits."""
        signal.signal(signum, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: non-finite numbers are logged as null."""
    return value if math.isfinite(value) else None


def fault_message(graph: TrainingGraph, out, run_dir: Path) -> str:
    """One line naming the step and the non-finite term, and what is kept."""
    k, term = graph.step_count, graph.last_fault
    if term == "gradient":
        what = f"gradient norm is {float(graph.last_grad_norm)} (loss {float(out.loss.detach())})"
    else:
        value = out.logs.get(term, out.loss) if term != "loss" else out.loss
        what = f"loss term '{term}' is {float(value.detach())}"
    kept = checkpoint.pointer(run_dir / "checkpoints")
    return (f"step {k}: {what}; stopped, the last good checkpoint "
            + (f"({kept}) stays latest" if kept else "(none yet) is kept")
            + "; set train.nonfinite = \"skip\" to skip such steps")


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
    checkpoint.atomic_text(path, "".join(kept))


def train(graph: TrainingGraph, run_dir: Path, console: Console | None = None, resumed: bool = False) -> dict:
    """Train for ``spec.train.steps`` steps, evaluate, and return the final metric by K.

    With ``resumed`` the graph holds a restored checkpoint (:func:`resume`) and the run folder's
    log is continued. SIGINT/SIGTERM write a checkpoint at the next step boundary and stop with a
    one-line UserError (exit 128 + signal) saying how to resume. A non-finite loss or gradient stops
    the run (``train.nonfinite = "stop"``) or skips the step (``"skip"``; counted and logged)."""
    console = console or Console(stderr=True)
    spec = graph.spec
    o, ev = spec.train, spec.eval
    ctx = graph.dist
    main, parallel = ctx.is_main, ctx.enabled  # only rank 0 writes the run folder and prints
    if not main:
        console = Console(stderr=True, quiet=True)
    log = None
    if graph.step_count == 0:  # what components draw from the global generators (dropout) starts from the seed
        engine.seed_globals(o.seed)
    if main:
        checkpoint.atomic_text(run_dir / "spec.toml", to_toml(spec))
        if not resumed or not (run_dir / "environment.json").exists():
            env = environment(graph)
            if parallel:
                env["world_size"] = ctx.world_size
            checkpoint.atomic_text(run_dir / "environment.json", json.dumps(env, indent=1))
        try:
            log = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{run_dir / 'metrics.jsonl'}: cannot write: {exc.strerror or exc}", exit_code=1) from None

    def write(record: dict) -> None:
        if log is None:
            return
        try:
            log.write(atomic.dumps(record) + "\n")
            log.flush()
        except OSError as exc:
            raise UserError(f"{run_dir / 'metrics.jsonl'}: cannot write: {exc.strerror or exc}",
                            exit_code=1) from None

    def save() -> None:
        checkpoint.save(graph, run_dir, keep=o.keep_checkpoints)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not (main and console.is_terminal))
    try:
        with progress, SignalStop() as stop:
            task = progress.add_task(spec.name, total=o.steps, completed=graph.step_count, loss="-", rate="-")
            window_start, window_steps, t0 = time.perf_counter(), 0, time.perf_counter()
            last_line = t0  # without a terminal (batch jobs, CI): a plain line every 30 s instead of the bar
            while graph.step_count < o.steps:
                out = engine.step(graph)
                window_steps += 1
                k = graph.step_count
                if graph.last_fault is not None:
                    if o.nonfinite == "stop":
                        raise UserError(fault_message(graph, out, run_dir), exit_code=1)
                    graph.counters["nonfinite_skipped"] = graph.counters.get("nonfinite_skipped", 0) + 1
                if k % o.log_every == 0 or k == o.steps:
                    if parallel:  # the whole batch's loss terms: the mean over the ranks
                        out.logs = distributed.all_mean(out.logs, graph.device)
                    now = time.perf_counter()
                    rate = window_steps / (now - window_start)
                    record = {"step": k, **{n: _finite(float(v)) for n, v in out.logs.items()},
                              "lr": graph.optimizer.param_groups[0]["lr"],
                              "grad_norm": _finite(float(graph.last_grad_norm)), "steps_per_sec": rate,
                              "elapsed": now - t0}
                    if o.nonfinite == "skip":
                        record["nonfinite_skipped"] = graph.counters.get("nonfinite_skipped", 0)
                    write(record)
                    loss = f"{record['loss']:.4f}" if record["loss"] is not None else "nan"
                    progress.update(task, loss=loss, rate=f"{rate:.1f}")
                    if not console.is_terminal and (now - last_line >= 30 or k == o.steps):
                        console.print(f"{spec.name}: step {k}/{o.steps}, loss {loss}, {rate:.1f} it/s, "
                                      f"{now - t0:.0f} s", highlight=False, soft_wrap=True)
                        last_line = now
                    window_start, window_steps = now, 0
                progress.update(task, completed=k)
                # evaluation before the checkpoint: a checkpoint at step k implies every record of step k
                if ev.every and k % ev.every == 0 and k < o.steps:
                    write({"step": k, "eval": evaluate(graph)})
                saved = bool(o.checkpoint_every and k % o.checkpoint_every == 0 and k < o.steps)
                if saved:
                    save()
                signalled = stop.signum is not None
                if parallel:  # every rank stops at the same step (a signal may reach them apart)
                    signalled = distributed.any_flag(signalled, graph.device)
                if signalled:
                    if not saved and k < o.steps:
                        save()
                    signum = stop.signum or signal.SIGTERM
                    name = signal.Signals(signum).name
                    raise UserError(f"{name}: stopped at step {k} with a checkpoint; resume with: "
                                    f"flowspec run --resume {run_dir}", exit_code=128 + signum)
        save()
        results = evaluate(graph, run_dir if main else None)
        if not main:
            return results
        extras = evaluate_baselines(graph, run_dir)
        log.close()  # the final record: the whole log rewritten at once (a full disk cuts no line)
        log, path = None, run_dir / "metrics.jsonl"
        kept = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        kept += "\n" if kept and not kept.endswith("\n") else ""
        checkpoint.atomic_text(path, kept + atomic.dumps({"step": graph.step_count, "eval": results, **extras}) + "\n")
        checkpoint.atomic_text(run_dir / "eval.json", atomic.dumps(
            {"step": graph.step_count, "num_samples": ev.num_samples, "metrics": list(graph.metrics),
             "steps": results, **extras}, indent=1))
    finally:
        if log is not None:
            log.close()
    console.print(results_table({**results, **extras.get("ode", {})},
                                f"{spec.name}: EMA flow map after {graph.step_count} steps"))
    if "flow_map_error" in extras:
        fme = extras["flow_map_error"]
        console.print(f"flow_map_error (MSE against the true map): (s, t) grid {fme['grid']:.4g}, "
                      f"(0, 1) {fme['0-1']:.4g}")
    return results


def resume(run_dir: Path, spec, source: str, warn, compile=None) -> TrainingGraph:
    """Compile ``spec`` and restore the run folder's newest good checkpoint into it.

    Args:
        run_dir: the run folder (with the resolved ``spec.toml`` and ``checkpoints/``).
        spec: the spec to continue with; it may differ from the run's only in ``train.steps``.
        source: where ``spec`` came from, for messages (a file, or ``--set``).
        warn: callback for one-line warnings (corrupted checkpoints skipped).
        compile: builds the graph (default :func:`flowspec.compile.compile_spec`).

    Returns:
        The graph at the checkpoint's step; metrics.jsonl is truncated to match it.
    """
    from flowspec.compile import compile_spec

    RunFolder(run_dir).check_resumable(spec, source)
    if not distributed.launched() or distributed.rank_from_env() == 0:
        runfolder.acquire(run_dir)  # before compiling: a live run is refused at once
    graph = (compile or compile_spec)(spec)
    main = graph.dist.is_main
    if main:
        checkpoint.remove_temporaries(run_dir)
    if checkpoint.stems(run_dir / "checkpoints"):
        checkpoint.newest(run_dir, warn, checkpoint.size_limit(graph.model), checkpoint.spec_id(spec),
                          accept=lambda ckpt: checkpoint.restore(graph, ckpt))
    else:
        warn(f"warning: {run_dir}: no checkpoint yet; starting again from step 0")
    if graph.step_count > spec.train.steps:
        raise UserError(f"{source}: train.steps: {spec.train.steps} is below the checkpoint's step "
                        f"{graph.step_count} (valid: >= {graph.step_count})")
    if graph.dist.enabled:
        distributed.barrier()  # every rank has read the checkpoint before rank 0 prunes
    if main:
        checkpoint.remove_after(run_dir / "checkpoints", graph.step_count)
        truncate_metrics(run_dir, graph.step_count, final=graph.step_count >= spec.train.steps)
    return graph
