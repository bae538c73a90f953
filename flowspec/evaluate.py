"""Evaluation: K-step flow-map sampling for each K in ``[eval] steps``, metrics, plots (flowspec.plots);
ODE baselines (``[eval] ode``) and the flow-map error against the true map (analytic targets).

Every row carries ``nfe`` (network evaluations per sample: K for the flow map) and ``seconds``.
With a closed-form velocity and ``[eval] flow_map_error``, every row also carries ``flow_map_error``:
mean |sample(x0) - X^true_{0,1}(x0)|^2 over the first ``flow_map_samples`` base samples, the true map
by float64 dopri5 at tolerance 1e-6 (flowspec.ode.TRUTH_TOL).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowspec import distributed
from flowspec.atomic import atomic_npy
from flowspec.flowmap import FlowMap
from flowspec.metrics import FeatureMetric
from flowspec.plots import density_plot


def base_samples(graph, n: int, seed: int) -> torch.Tensor:
    """n base samples x0 from a dedicated generator (the same x0 for every K and every run)."""
    dtype = next(graph.model.parameters()).dtype
    return graph.base.fixed(n, tuple(graph.dataset.shape), seed, device=graph.device, dtype=dtype)


@torch.no_grad()
def sample(flow_map: FlowMap, x0: torch.Tensor, steps: int, chunk: int = 65_536) -> torch.Tensor:
    """K-step samples of x0 in chunks, returned on the CPU as float32."""
    flow_map.eval()
    return torch.cat([flow_map.sample(x, steps).float().cpu() for x in x0.split(chunk)])


def true_endpoints(graph, x0: torch.Tensor) -> torch.Tensor | None:
    """X^true_{0,1}(x0[:flow_map_samples]) on the CPU (float64), or None when not applicable.
    Computed once per graph (x0 is the graph's own evaluation base, the same at every evaluation)."""
    o = graph.spec.eval
    if graph.exact is None or not o.flow_map_error:
        return None
    if "true_endpoints" not in graph.cache:
        graph.cache["true_endpoints"] = solve_endpoints(graph.exact.velocity, x0[: o.flow_map_samples])
    return graph.cache["true_endpoints"]


def solve_endpoints(velocity, x0: torch.Tensor) -> torch.Tensor | None:
    """X^true_{0,1}(x0) of a closed-form velocity on the CPU (float64, flowspec.ode.true_flow_map), or
    None with a warning when it cannot be integrated."""
    from flowspec.ode import true_flow_map

    try:
        return true_flow_map(velocity, 0.0, 1.0, x0.detach().cpu().double())
    except (AssertionError, RuntimeError, ValueError) as exc:  # e.g. "underflow in dt" on absurd data
        _unsolvable(exc)
        return None


def score(x: torch.Tensor, metrics: dict, dataset, seed: int,
          features: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Each metric of samples x against the data; a metric's own draws come from a generator seeded
    ``seed + 1`` (``seed``: eval.seed, which seeds the base samples), the same in every evaluation.
    A feature metric whose features of x are given (``features[name]``) is computed from them."""
    features = features or {}
    row = {}
    for name, metric in metrics.items():
        g = torch.Generator().manual_seed(seed + 1)
        if name in features:
            row[name] = float(metric.from_features(features[name], dataset, g))
        else:
            row[name] = float(metric(x, dataset, g))
    return row


def _unsolvable(exc: BaseException) -> None:
    import sys

    text = str(exc).splitlines()[0] if str(exc) else ""
    sys.stderr.write(f"warning: flow_map_error: the true flow map could not be integrated "
                     f"({type(exc).__name__}: {text[:120]}); the column is left out\n")


def endpoint_error(x: torch.Tensor, truth: torch.Tensor | None, row: dict) -> None:
    if truth is not None:
        row["flow_map_error"] = float((x[: truth.shape[0]].double() - truth).pow(2).flatten(1).sum(1).mean())


def sample_sharded(graph, x0: torch.Tensor, steps: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(K-step samples of every x0 (N, ...), this process's share of them). In a data-parallel run
    rank r samples part r of x0.tensor_split(W) and rank 0 gathers them (the others get None);
    with one process both are all the samples."""
    ctx = graph.dist
    if not ctx.enabled:
        x = sample(graph.sampler(), x0, steps)
        return x, x
    mine = sample(graph.sampler(), x0.tensor_split(ctx.world_size)[ctx.rank], steps)
    return distributed.gather_rows(mine, x0.shape[0], graph.device), mine


def sharded_features(graph, mine: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """In a data-parallel run, the features of every feature metric (FID, digits_fd) of all n
    samples: each rank extracts those of its share ``mine`` and rank 0 gathers them (the others get
    {}). With one process {}: the metrics extract them themselves."""
    if not graph.dist.enabled:
        return {}
    features = {name: distributed.gather_rows(metric.features(mine), n, graph.device)
                for name, metric in graph.metrics.items() if isinstance(metric, FeatureMetric)}
    return {name: f for name, f in features.items() if f is not None}


def evaluate(graph, out_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Metric by K for the EMA flow map; writes samples/steps-K.{npy,png} when out_dir is given.
    In a data-parallel run every rank samples its share and extracts its features (FID, digits_fd),
    and rank 0 computes the metrics from the gathered samples and features (the other ranks return {}).

    Returns:
        {str(K): {metric name: value, "flow_map_error" (analytic targets), "nfe": K,
        "seconds": sampling wall time}}.
    """
    o = graph.spec.eval
    x0 = base_samples(graph, o.num_samples, o.seed)
    main = graph.dist.is_main
    truth = true_endpoints(graph, x0) if main else None
    results: dict[str, dict[str, float]] = {}
    for k in o.steps:
        start = time.perf_counter()
        x, mine = sample_sharded(graph, x0, k)
        seconds = time.perf_counter() - start
        features = sharded_features(graph, mine, x0.shape[0])
        if x is None:
            continue
        row = score(x, graph.metrics, graph.dataset, o.seed, features)
        endpoint_error(x, truth, row)
        row["nfe"] = k
        row["seconds"] = seconds
        results[str(k)] = row
        if out_dir is not None:
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            atomic_npy(out_dir / "samples" / f"steps-{k}.npy", x.numpy())
            if o.plot:
                density_plot(x, graph.dataset, out_dir / "samples" / f"steps-{k}.png",
                     f"{graph.spec.name}: {k} step{'s' if k > 1 else ''}  "
                     + "  ".join(f"{n}={v:.4g}" for n, v in row.items() if n in graph.metrics))
    return results


def evaluate_baselines(graph, out_dir: Path | None = None) -> dict:
    """ODE rows and the (s, t)-grid flow-map error.

    Returns:
        {"ode": {label: {metric: value, "flow_map_error", "nfe", "seconds"}},
         "flow_map_error": {"grid": ..., "0-1": ...}} (each key only when it applies).
    """
    from flowspec import ode

    o = graph.spec.eval
    extras: dict = {}
    if o.ode:
        x0 = base_samples(graph, o.num_samples, o.seed)
        truth = true_endpoints(graph, x0)
        rows: dict[str, dict] = {}
        model = graph.sampler()
        model.eval()
        sources = {"model": model.velocity, "exact": getattr(graph.exact, "velocity", None),
                   "teacher": getattr(graph.frozen_teacher, "velocity", None)}
        for opts in o.ode:
            start = time.perf_counter()
            try:
                x, nfe, seconds = ode.sample(sources[opts.velocity], x0, opts)
            except (AssertionError, RuntimeError) as exc:  # e.g. torchdiffeq's "underflow in dt"
                # a failed baseline must not lose the run's other results
                rows[opts.label()] = {"error": f"{type(exc).__name__}: {exc}",
                                      "seconds": time.perf_counter() - start}
                continue
            row = score(x, graph.metrics, graph.dataset, o.seed)
            endpoint_error(x, truth, row)
            row["nfe"] = nfe
            row["seconds"] = seconds
            rows[opts.label()] = row
            if out_dir is not None:
                (out_dir / "samples").mkdir(parents=True, exist_ok=True)
                stem = opts.label().replace(" ", "-").replace("/", "_").replace("=", "")
                atomic_npy(out_dir / "samples" / f"{stem}.npy", x.numpy())
        extras["ode"] = rows
    if graph.exact is not None and o.flow_map_error:
        g = torch.Generator().manual_seed(o.seed + 2)
        n = o.flow_map_samples
        x1 = graph.dataset.sample(n, g).to(graph.device)
        x0 = base_samples(graph, n, o.seed + 3)
        try:
            extras["flow_map_error"] = ode.flow_map_error(graph.sampler(), graph.exact.velocity, x0, x1,
                                                          graph.interpolant)
        except (AssertionError, RuntimeError, ValueError) as exc:
            _unsolvable(exc)
    return extras
