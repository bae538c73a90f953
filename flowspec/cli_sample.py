"""``flowspec sample RUN``: samples of a run's EMA flow map (or of the ODE of its diagonal), shaped like
the data, as a .npy file and, on request, a picture (an image grid, or a 2-D histogram beside the
data's density)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from flowspec.errors import UserError


def _ode(run, x0, steps: int, solver: str, rtol: float, atol: float):
    """(samples, what was done) of the probability-flow ODE of the map's diagonal v_{t,t}."""
    from typing import get_args

    from pydantic import ValidationError

    from flowspec import ode

    valid = get_args(ode.Solver)
    if solver not in valid:
        raise UserError(f"--solver: {solver!r} is not valid (valid: {', '.join(valid)})")
    try:
        opts = ode.ODEOptions(solver=solver, steps=steps, rtol=rtol, atol=atol)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"--{e['loc'][0]}: {e['msg'].lower()} (got {e['input']!r})") from None
    x, nfe, seconds = ode.sample(run.flow_map.velocity, x0, opts)
    return x, f"ODE {opts.label()}, NFE {nfe}, {seconds:.2f} s"


def sample(run_dir: Path = typer.Argument(..., help="a run folder (read only)"),
           steps: int = typer.Option(1, "--steps", min=1, help="flow-map steps K (or fixed-grid ODE steps)"),
           n: int = typer.Option(10_000, "--n", min=1, help="number of samples"),
           out_file: Path | None = typer.Option(None, "--out", help="output .npy file: float32, (N, *data shape)"),
           png: Path | None = typer.Option(None, "--png", help="also draw them: an image grid, or a 2-D "
                                           "histogram beside the data's density"),
           seed: int | None = typer.Option(None, "--seed", min=0, help="seed of the base samples (default: "
                                           "the run's eval.seed, the x0 of its eval.json)"),
           step: int | None = typer.Option(None, "--step", help="the checkpoint's step (default: the newest)"),
           device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
           solver: str | None = typer.Option(
               None, "--solver", help="integrate the diagonal velocity v_{t,t} instead: "
               "euler | midpoint | heun | rk4 (--steps K) | dopri5 (--rtol, --atol)"),
           rtol: float = typer.Option(1e-5, "--rtol", help="dopri5 relative tolerance"),
           atol: float = typer.Option(1e-5, "--atol", help="dopri5 absolute tolerance")) -> None:
    """Draw samples from a run's EMA flow map (or, with --solver, from the ODE of its diagonal)."""
    from flowspec.atomic import atomic_npy
    from flowspec.evaluate import sample as draw
    from flowspec.trained import load_run

    if out_file is None and png is None:
        raise UserError("sample: nothing to write: give --out FILE.npy, --png FILE.png or both")
    run = load_run(run_dir, device, step=step, warn=lambda line: typer.echo(line, err=True))
    x0 = run.base_samples(n, seed)
    if solver is None:
        x, how = draw(run.flow_map, x0, steps), f"{steps} step{'s' if steps > 1 else ''}"
    else:
        x, how = _ode(run, x0, steps, solver, rtol, atol)
    x = x.float().cpu().reshape(n, *run.shape)
    if out_file is not None:
        atomic_npy(out_file, x.numpy())
    if png is not None:
        from flowspec.plots import density_plot, grid_plot

        title = f"{run.spec.name}: {how}, step {run.step}"
        grid_plot(x, png, title) if x.ndim == 4 else density_plot(x, run.dataset, png, title)
    written = " and ".join(str(p) for p in (out_file, png) if p is not None)
    Console().print(f"{written}: {n} samples of shape {tuple(run.shape)}, {how}, from {run.checkpoint.name}",
                    highlight=False, soft_wrap=True, markup=False)
