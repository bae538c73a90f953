"""``flowspec check RUN``: how far a trained map is from being a flow map, with the spread."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:  # torch and the components load with the command, not with ``flowspec --help``
    import torch

    from flowspec.data.base import Dataset
    from flowspec.interpolants import Interpolant
    from flowspec.runs import LoadedMap, RunFolder, Warn


def reference_velocity(run: RunFolder, loaded: LoadedMap, dataset: Dataset, interpolant: Interpolant
                       ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(b(t, x), its name) a run's map is checked against: the dataset's exact velocity, else the
    [teacher] velocity, else the map's own diagonal v_{t,t} (then only self-consistency is measured)."""
    from flowspec.build import base_scale
    from flowspec.data.analytic import exact_velocity

    exact = exact_velocity(dataset, interpolant, base_scale(run.spec, dataset))
    if exact is not None:
        return exact.velocity, "exact"
    t = run.spec.teacher
    if t is not None and t.kind == "run":
        from flowspec.teachers import load_run_teacher

        device = next(loaded.flow_map.parameters()).device
        return load_run_teacher(t.run_folder, device, loaded.shape).velocity, "teacher"
    return loaded.flow_map.velocity, "own diagonal v_{t,t}"


def spread(values: torch.Tensor) -> dict[str, float]:
    """mean, std, median, 90th percentile and max of a (N,) tensor, as floats."""
    import torch

    v = values.double().cpu()
    q = torch.quantile(v, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(q[0]), "q90": float(q[1]),
            "max": float(v.max())}


def check_run(run: RunFolder, device: str = "auto", *, step: int | None = None, n: int = 2000, seed: int = 0,
              warn: Warn | None = None) -> dict:
    """The flow-map conditions of a run's EMA map on n points: x = I_s(x0, x1) with x0 from the run's
    base and x1 from its data, (s, t) uniform on the triangle s < t, u = (s + t) / 2; per-sample
    Euclidean norms of the Lagrangian, Eulerian and semigroup residuals
    (flowspec.testing.flow_map_checks.flow_map_residuals, with the run's jvp strategy), each
    summarised by :func:`spread`.

    Returns:
        {"checkpoint", "velocity", "n", "residuals": {condition: spread}, "speed": spread of |b_t(X)|}.
    """
    import torch

    from flowspec.build import build, seeded
    from flowspec.objectives.base import upper_triangle
    from flowspec.registry import default_registry
    from flowspec.testing.flow_map_checks import CONDITIONS, flow_map_residuals

    spec, registry = run.spec, default_registry()
    loaded = run.flow_map(device, step=step, warn=warn)
    with seeded(spec.train.seed):
        dataset = build(registry, "datasets", spec.data)
    interpolant = build(registry, "interpolants", spec.interpolant)
    velocity, source = reference_velocity(run, loaded, dataset, interpolant)
    g = torch.Generator().manual_seed(seed)
    x0 = loaded.base_samples(n, seed)
    x1 = dataset.sample(n, g).to(x0)
    s, t = (v.to(x0) for v in upper_triangle(n, dtype=torch.float64, generator=g))
    xs, _ = interpolant.interpolate(s, x0, x1)
    res = flow_map_residuals(loaded.flow_map, velocity, s, t, xs, strategy=spec.objective.jvp)
    return {"checkpoint": str(loaded.checkpoint), "velocity": source, "n": n,
            "residuals": {k: spread(res[k]) for k in CONDITIONS}, "speed": spread(res["speed"])}


def check(run_dir: Path = typer.Argument(..., help="a run folder (read only)"),
          step: int | None = typer.Option(None, "--step", help="the checkpoint's step (default: the newest)"),
          n: int = typer.Option(2000, "--n", min=2, help="number of points (x, s, t)"),
          seed: int = typer.Option(0, "--seed", help="seed of the points"),
          device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
          json_out: Path | None = typer.Option(None, "--json", help="also write the numbers to this file")) -> None:
    """Measure the Lagrangian, Eulerian and semigroup residuals of a run's EMA flow map against the
    exact velocity (or the teacher's, or the map's own diagonal), each as mean ± std and quantiles."""
    from flowspec.runs import RunFolder

    result = check_run(RunFolder(run_dir), device, step=step, n=n, seed=seed,
                       warn=lambda line: typer.echo(line, err=True))
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
