"""``flowspec eval RUN``: metrics of a run's EMA flow map on demand (any K, metrics, sample count),
written to a new file ``RUN/evals/eval-TIMESTAMP.json``; the training records (metrics.jsonl,
eval.json, checkpoints, samples) are never touched."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.console import Console

from flowspec import atomic
from flowspec.errors import UserError


def _listed(values: list[str] | None, option: str) -> list[str] | None:
    """Repeated and comma-separated values of an option as one list (None: not given)."""
    if not values:
        return None
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{option}: no value given")
    return items


def _whole(values: list[str] | None, option: str) -> list[int] | None:
    items = _listed(values, option)
    if items is None:
        return None
    out = []
    for item in items:
        if not item.isdigit() or int(item) < 1:
            raise UserError(f"{option}: {item!r} is not valid (valid: whole numbers >= 1, e.g. {option} 1,2,4)")
        out.append(int(item))
    return out


def write_eval(run_dir: Path, record: dict) -> Path:
    """``record`` as a new file RUN/evals/eval-YYYYMMDD-HHMMSS.json (``-2``, ``-3``, ... when taken),
    written atomically; the path."""
    stem = f"eval-{dt.datetime.now():%Y%m%d-%H%M%S}"
    folder = Path(run_dir) / "evals"
    path, k = folder / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}.json"
    atomic.atomic_text(path, atomic.dumps(record, indent=1) + "\n")
    return path


def eval_run(run_dir: Path = typer.Argument(..., help="a run folder (its training records stay as they are)"),
             steps: list[str] | None = typer.Option(
                 None, "--steps", help="flow-map steps K, repeatable or comma-separated (default: eval.steps)"),
             metrics: list[str] | None = typer.Option(
                 None, "--metrics", help="metric names, repeatable or comma-separated (default: eval.metrics)"),
             n: int | None = typer.Option(None, "--n", min=1, help="samples per K (default: eval.num_samples)"),
             seed: int | None = typer.Option(None, "--seed", min=0,
                                             help="seed of the base samples (default: eval.seed, as eval.json)"),
             step: int | None = typer.Option(None, "--step", help="the checkpoint's step (default: the newest)"),
             device: str = typer.Option("auto", "--device", help="auto | cpu | cuda")) -> None:
    """Evaluate a run's EMA flow map (K-step samples and metrics) into a new file RUN/evals/eval-*.json."""
    from flowspec.registry import default_registry
    from flowspec.train import results_table
    from flowspec.trained import load_run

    ks, names = _whole(steps, "--steps"), _listed(metrics, "--metrics")
    known = default_registry().names("metrics")
    for name in names or []:
        if name not in known:
            raise UserError(f"--metrics: unknown metric {name!r} (known: {', '.join(known)})")
    err = Console(stderr=True)
    run = load_run(run_dir, device, step=step, warn=lambda line: typer.echo(line, err=True))
    o = run.spec.eval
    ks, names = ks or list(o.steps), names or list(o.metrics)
    n = n or o.num_samples
    seed = o.seed if seed is None else seed
    err.print(f"{run_dir}: {run.checkpoint.name}: K in {ks}, {n:,} samples each, seed {seed}, "
              f"metrics {', '.join(names) or 'none'}", highlight=False, soft_wrap=True, markup=False)
    results = run.evaluate(steps=ks, metrics=names, n=n, seed=seed)
    record = {"created": dt.datetime.now().isoformat(timespec="seconds"), "checkpoint": run.checkpoint.name,
              "digest": run.digest, "step": run.step, "num_samples": n, "seed": seed, "metrics": names,
              "steps": results}
    path = write_eval(run_dir, record)
    Console().print(results_table(results, f"{run.spec.name}: EMA flow map at step {run.step}"))
    Console().print(str(path), highlight=False, soft_wrap=True, markup=False)
