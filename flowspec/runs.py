"""Reading a finished (or running) run folder: its resolved spec compiled, its EMA flow map loaded.

The one loader behind ``flowspec sample``, ``flowspec check`` and ``[teacher] kind = "run"``: the run
folder is only read (spec.toml and a checkpoint's tensor file, checksum verified; nothing pickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

#: overrides applied to a run's own spec when it is loaded for reading: no evaluation work at compile
READ_OVERRIDES = ("eval.metrics=[]", "eval.flow_map_error=false", "eval.ode=[]")


@dataclass
class LoadedRun:
    """A compiled run with its EMA weights: ``graph.ema.model`` is the flow map; ``checkpoint`` the
    file the weights came from and ``digest`` its verified SHA-256."""

    graph: object
    checkpoint: Path
    digest: str = ""


def load_run(run_dir: Path | str, device: str = "auto", *, step: int | None = None, label: str = "",
             warn: Callable[[str], None] | None = None) -> LoadedRun:
    """Compile ``run_dir/spec.toml`` on ``device`` and load the EMA weights of a checkpoint into
    ``graph.ema.model``, leaving the global RNG state as it was (compiling seeds it). The checkpoint
    is the newest good one of this run (:func:`flowspec.checkpoint.newest`: every byte verified, another
    run's checkpoint copied in skipped), or the one at ``step``.

    Args:
        run_dir: the run folder.
        device: train.device for the compiled graph (auto | cpu | cuda).
        step: the checkpoint's step (default: the newest good one).
        label: prefix of error messages (e.g. "teacher.path: ").
        warn: where warnings about skipped checkpoints go.
    Raises:
        UserError: not a run folder, no (such) good checkpoint, weights that do not match the network.
    """
    from flowspec import checkpoint
    from flowspec.compile import compile_spec
    from flowspec.errors import UserError
    from flowspec.spec import load_spec

    run = Path(run_dir)
    if not (run / "spec.toml").is_file():
        raise UserError(f"{label}{run_dir}: not a run folder (no spec.toml)")
    spec = load_spec(run / "spec.toml", [f"train.device={device}", *READ_OVERRIDES])
    rng = torch.random.get_rng_state()
    graph = compile_spec(spec)
    torch.random.set_rng_state(rng)
    model = graph.ema.model
    run_id = checkpoint.spec_id(load_spec(run / "spec.toml"))
    limit = checkpoint.size_limit(model)
    if step is None:
        ckpt = checkpoint.newest(run, warn, limit, run_id,
                                 accept=lambda c: checkpoint.check_module(model, c.tensors, "ema", c.path))
    else:
        path = run / "checkpoints" / f"step-{step:08d}.safetensors"
        if not path.is_file():
            have = ", ".join(str(int(s[5:])) for s in checkpoint.stems(run / "checkpoints")) or "none"
            raise UserError(f"{label}{run_dir}: no checkpoint at step {step} (have: {have})", exit_code=1)
        ckpt = checkpoint.read(path, limit, run_id)
    checkpoint.load_module(model, ckpt.tensors, "ema", ckpt.path)
    return LoadedRun(graph, ckpt.path, ckpt.digest)


def reference_velocity(graph) -> tuple[object, str]:
    """(b(t, x), its name) a run's map is checked against: the dataset's exact velocity, else the
    [teacher] velocity, else the map's own diagonal v_{t,t} (then only self-consistency is measured)."""
    if graph.exact is not None:
        return graph.exact.velocity, "exact"
    if graph.frozen_teacher is not None and hasattr(graph.frozen_teacher, "velocity"):
        return graph.frozen_teacher.velocity, "teacher"
    return graph.sampler().velocity, "own diagonal v_{t,t}"


def spread(values: torch.Tensor) -> dict[str, float]:
    """mean, std, median, 90th percentile and max of a (N,) tensor, as floats."""
    v = values.double().cpu()
    q = torch.quantile(v, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(q[0]), "q90": float(q[1]),
            "max": float(v.max())}


def check_run(run: LoadedRun, n: int = 2000, seed: int = 0) -> dict:
    """The flow-map conditions of a run's EMA map on n points: x = I_s(x0, x1) with x0 from the run's
    base and x1 from its data, (s, t) uniform on the triangle s < t, u = (s + t) / 2; per-sample
    Euclidean norms of the Lagrangian, Eulerian and semigroup residuals
    (flowspec.testing.flow_map_checks.flow_map_residuals, with the run's jvp strategy), each
    summarised by :func:`spread`.

    Returns:
        {"checkpoint", "velocity", "n", "residuals": {condition: spread}, "speed": spread of |b_t(X)|}.
    """
    from flowspec.evaluate import base_samples
    from flowspec.testing.flow_map_checks import CONDITIONS, flow_map_residuals

    graph = run.graph
    fm = graph.sampler().eval()
    velocity, source = reference_velocity(graph)
    g = torch.Generator().manual_seed(seed)
    x0 = base_samples(graph, n, seed)
    x1 = graph.dataset.sample(n, g).to(x0)
    pair = torch.rand(n, 2, generator=g, dtype=torch.float64)
    s, t = (pair.min(1).values.to(x0), pair.max(1).values.to(x0))
    xs, _ = graph.interpolant.interpolate(s, x0, x1)
    res = flow_map_residuals(fm, velocity, s, t, xs, strategy=getattr(graph.objective.options, "jvp", "exact"))
    return {"checkpoint": str(run.checkpoint), "velocity": source, "n": n,
            "residuals": {k: spread(res[k]) for k in CONDITIONS}, "speed": spread(res["speed"])}
