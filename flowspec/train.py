"""The training loop (docs/design.md, "train"): steps (flowspec.engine) until ``train.steps``, on a
:class:`Cadence` of logging, evaluation and checkpoints, into the run folder's files
(flowspec.runlog) and checkpoints (flowspec.checkpoint); then the final evaluation.

Run folder ``runs/<name>-<timestamp>/``: ``spec.toml`` (resolved), ``environment.json``,
``metrics.jsonl``, ``checkpoints/``, ``samples/steps-K.{png,npy}`` and ``eval.json``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowspec import checkpoint, distributed, engine, runfolder
from flowspec.engine import TrainingGraph
from flowspec.errors import UserError
from flowspec.evaluate import evaluate, evaluate_baselines
from flowspec.objectives.base import LossOutput
from flowspec.runlog import RunLog, finite, truncate_metrics
from flowspec.runs import RunFolder
from flowspec.spec.models import EvalOptions, TrainOptions


@dataclass(frozen=True)
class Cadence:
    """When a step is logged, evaluated and checkpointed: functions of the step count k alone (so a
    resumed run does what the uninterrupted one did). The last step is always logged; its
    evaluation and checkpoint are the end of the run's."""

    train: TrainOptions
    eval: EvalOptions

    def log(self, k: int) -> bool:
        return k % self.train.log_every == 0 or k == self.train.steps

    def evaluate(self, k: int) -> bool:
        return bool(self.eval.every) and k % self.eval.every == 0 and k < self.train.steps

    def checkpoint(self, k: int) -> bool:
        every = self.train.checkpoint_every
        return bool(every) and k % every == 0 and k < self.train.steps


#: seconds between two progress lines off a terminal
PROGRESS_SECONDS = 30.0


def duration(seconds: float) -> str:
    """A duration for progress lines: "42 s", "3 min 05 s", "2 h 07 min"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Reporter:
    """Progress on the console: a bar on a terminal; without one (batch jobs, CI) a plain line every
    ``every`` seconds and at the last step, with the time elapsed and the time left to the last
    step (at this process's mean speed). Silent on ranks other than 0.

    ``elapsed``: seconds already trained before this process (a resumed run's last logged
    ``elapsed``), so that metrics.jsonl's ``elapsed`` counts the whole run's training time."""

    def __init__(self, graph: TrainingGraph, console: Console, every: float | None = None, elapsed: float = 0.0):
        spec = graph.spec
        every = PROGRESS_SECONDS if every is None else every
        self.name, self.steps, self.every, self.console = spec.name, spec.train.steps, every, console
        self.offset, self.first_step = elapsed, graph.step_count
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                            disable=console.quiet or not console.is_terminal)
        self.task = self.bar.add_task(spec.name, total=self.steps, completed=graph.step_count, loss="-", rate="-")
        self.t0 = self.last_line = self.window_start = time.perf_counter()
        self.window_steps = 0

    def stepped(self, k: int) -> None:
        self.window_steps += 1
        self.bar.update(self.task, completed=k)

    def rate(self) -> tuple[float, float]:
        """(steps per second since the last logged step, seconds of training in all), and a new window."""
        now = time.perf_counter()
        rate = self.window_steps / (now - self.window_start)
        self.window_start, self.window_steps = now, 0
        return rate, self.offset + now - self.t0

    def remaining(self, k: int) -> float | None:
        """Seconds to the last step at this process's mean speed so far (None before a step is done)."""
        done = k - self.first_step
        return (self.steps - k) * (time.perf_counter() - self.t0) / done if done > 0 else None

    def logged(self, k: int, record: dict) -> None:
        loss = f"{record['loss']:.4f}" if record["loss"] is not None else "nan"
        rate = record["steps_per_sec"]
        self.bar.update(self.task, loss=loss, rate=f"{rate:.1f}")
        now = time.perf_counter()
        if not self.console.is_terminal and not self.console.quiet and (now - self.last_line >= self.every
                                                                         or k == self.steps):
            left = self.remaining(k)
            eta = f", ETA {duration(left)}" if left is not None and k < self.steps else ""
            self.console.print(f"{self.name}: step {k}/{self.steps}, loss {loss}, {rate:.1f} it/s, "
                               f"{duration(record['elapsed'])} elapsed{eta}", highlight=False, soft_wrap=True,
                               markup=False)
            self.last_line = now

    def __enter__(self) -> Reporter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


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
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, self._again if previous is signal.default_int_handler else previous)

    @staticmethod
    def _again(signum: int, frame) -> None:
        """A second Ctrl-C: interrupt now, and ignore any further one while the process exits."""
        signal.signal(signum, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def fault_message(graph: TrainingGraph, out, run_dir: Path) -> str:
    """One line naming the step and the non-finite term, and what is kept."""
    k, term = graph.step_count, graph.last_fault
    if term == "gradient":
        what = f"gradient norm is {float(graph.last_grad_norm)} (loss {float(out.loss.detach())})"
    elif term is not None and term.startswith("rank "):  # another process's loss (flowspec.engine.nonfinite_term)
        what = f"the loss on {term} is not finite"
    else:
        value = out.logs.get(term, out.loss) if term != "loss" else out.loss
        what = f"loss term '{term}' is {float(value.detach())}"
    kept = checkpoint.pointer(run_dir / "checkpoints")
    return (f"step {k}: {what}; stopped, the last good checkpoint "
            + (f"({kept}) stays latest" if kept else "(none yet) is kept")
            + "; set train.nonfinite = \"skip\" to skip such steps")


def step_record(graph: TrainingGraph, out: LossOutput, rate: float, elapsed: float) -> dict:
    """One line of metrics.jsonl: the step's loss terms (their mean over the ranks), learning rate,
    gradient norm, speed, elapsed seconds (and the count of skipped non-finite steps)."""
    logs = distributed.all_mean(out.logs, graph.device) if graph.dist.enabled else out.logs
    record = {"step": graph.step_count, **{n: finite(float(v)) for n, v in logs.items()},
              "lr": graph.optimizer.param_groups[0]["lr"], "grad_norm": finite(float(graph.last_grad_norm)),
              "steps_per_sec": rate, "elapsed": elapsed}
    if graph.spec.train.nonfinite == "skip":
        record["nonfinite_skipped"] = graph.counters.get("nonfinite_skipped", 0)
    return record


def logged_elapsed(run_dir: Path) -> float:
    """The last ``elapsed`` in a run folder's metrics.jsonl (0 when none): where a resumed run's
    clock starts."""
    path, last = run_dir / "metrics.jsonl", 0.0
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                value = json.loads(line).get("elapsed")
            except (ValueError, AttributeError):
                continue
            if isinstance(value, (int, float)):
                last = float(value)
    return last


def evaluation_size(graph: TrainingGraph) -> str:
    """One line before the final evaluation, which on a small run can outlast the training: the
    flow-map rows (K values x samples, network passes in all), the ODE rows and the flow-map error."""
    o, n = graph.spec.eval, graph.spec.eval.num_samples
    ks = ", ".join(map(str, o.steps))
    parts = [f"{len(o.steps)} K value{'s' if len(o.steps) > 1 else ''} ({ks}) x {n:,} samples "
             f"= {sum(o.steps) * n:,} flow-map passes"]
    if o.ode:
        parts.append(f"{len(o.ode)} ODE row{'s' if len(o.ode) > 1 else ''} ({', '.join(x.label() for x in o.ode)}) "
                     f"on {n:,} samples")
    if graph.exact is not None and o.flow_map_error:
        parts.append(f"the flow-map error ({o.flow_map_samples:,} samples per pair of a 5-point (s, t) grid, dopri5)")
    metrics = f"; metrics {', '.join(o.metrics)}" if o.metrics else ""
    return f"{graph.spec.name}: evaluating " + " + ".join(parts) + metrics


def train(graph: TrainingGraph, run_dir: Path, console: Console | None = None, resumed: bool = False) -> dict:
    """Train for ``spec.train.steps`` steps, evaluate, and return the final metric by K.

    With ``resumed`` the graph holds a restored checkpoint (:func:`resume`) and the run folder's
    log is continued. SIGINT/SIGTERM write a checkpoint at the next step boundary and stop with a
    one-line UserError (exit 128 + signal) saying how to resume. A non-finite loss or gradient stops
    the run (``train.nonfinite = "stop"``) or skips the step (``"skip"``; counted and logged)."""
    spec, main = graph.spec, graph.dist.is_main  # only rank 0 writes the run folder and prints
    o = spec.train
    console = console or Console(stderr=True)
    if not main:
        console = Console(stderr=True, quiet=True)
    if graph.step_count == 0:  # what components draw from the global generators (dropout) starts from the seed
        engine.seed_globals(o.seed)
    cadence = Cadence(o, spec.eval)

    def save() -> None:
        checkpoint.save(graph, run_dir, keep=o.keep_checkpoints)

    elapsed = logged_elapsed(run_dir) if resumed and main else 0.0
    with RunLog(graph, run_dir if main else None, resumed) as log:
        with Reporter(graph, console, elapsed=elapsed) as report, SignalStop() as stop:
            while graph.step_count < o.steps:
                out = engine.step(graph)
                k = graph.step_count
                report.stepped(k)
                if graph.last_fault is not None:
                    if o.nonfinite == "stop":
                        raise UserError(fault_message(graph, out, run_dir), exit_code=1)
                    graph.counters["nonfinite_skipped"] = graph.counters.get("nonfinite_skipped", 0) + 1
                if cadence.log(k):
                    record = step_record(graph, out, *report.rate())
                    log.write(record)
                    report.logged(k, record)
                # evaluation before the checkpoint: a checkpoint at step k implies every record of step k
                if cadence.evaluate(k):
                    log.write({"step": k, "eval": evaluate(graph)})
                saved = cadence.checkpoint(k)
                if saved:
                    save()
                signalled = stop.signum is not None
                if graph.dist.enabled:  # every rank stops at the same step (a signal may reach them apart)
                    signalled = distributed.any_flag(signalled, graph.device)
                if signalled:
                    if not saved and k < o.steps:
                        save()
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    raise UserError(f"{name}: stopped at step {k} with a checkpoint; resume with: "
                                    f"flowspec run --resume {run_dir}", exit_code=128 + (stop.signum or signal.SIGTERM))
        save()
        console.print(evaluation_size(graph), highlight=False, soft_wrap=True, markup=False)
        results = evaluate(graph, run_dir if main else None)
        if not main:
            return results
        extras = evaluate_baselines(graph, run_dir)
        log.finish(graph, results, extras)
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

    run = RunFolder(run_dir)
    run.check_resumable(spec, source)
    if not distributed.launched() or distributed.rank_from_env() == 0:
        runfolder.acquire(run_dir)  # before compiling: a live run is refused at once
    graph = (compile or compile_spec)(spec)
    main = graph.dist.is_main
    if main:
        checkpoint.remove_temporaries(run_dir)
    if run.steps():
        run.checkpoint(checkpoint.size_limit(graph.model), warn=warn,
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
