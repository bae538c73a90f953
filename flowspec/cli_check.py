"""``flowspec check RUN``: how far a trained map is from being a flow map, with the spread."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console


def check(run_dir: Path = typer.Argument(..., help="a run folder (read only)"),
          step: int | None = typer.Option(None, "--step", help="the checkpoint's step (default: the newest)"),
          n: int = typer.Option(2000, "--n", min=2, help="number of points (x, s, t)"),
          seed: int = typer.Option(0, "--seed", help="seed of the points"),
          device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
          json_out: Path | None = typer.Option(None, "--json", help="also write the numbers to this file")) -> None:
    """Measure the Lagrangian, Eulerian and semigroup residuals of a run's EMA flow map against the
    exact velocity (or the teacher's, or the map's own diagonal), each as mean ± std and quantiles."""
    from flowspec.runs import check_run, load_run

    result = check_run(load_run(run_dir, device, step=step, warn=lambda line: typer.echo(line, err=True)),
                       n=n, seed=seed)
    labels = {"lagrangian": "Lagrangian |dX/dt - b_t(X)|", "eulerian": "Eulerian   |dX/ds + grad X b_s|",
              "semigroup": "semigroup  |X_ut(X_su) - X_st|"}
    lines = [f"{run_dir}: {Path(result['checkpoint']).name}, velocity {result['velocity']}, {n} points "
             "x = I_s, s < t uniform, u = (s + t) / 2"]
    for key, label in labels.items():
        r = result["residuals"][key]
        lines.append(f"  {label}  {r['mean']:.4g} ± {r['std']:.3g}   median {r['median']:.4g}  "
                     f"90% {r['q90']:.4g}  max {r['max']:.4g}")
    sp = result["speed"]
    lines.append(f"  scale |b_t(X)|                 {sp['mean']:.4g} ± {sp['std']:.3g}")
    Console().print("\n".join(lines), highlight=False, soft_wrap=True, markup=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
