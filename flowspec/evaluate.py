"""Evaluation: K-step flow-map sampling for each K in ``[eval] steps``, metrics, scatter plots."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from flowspec.flowmap import FlowMap


def base_samples(graph, n: int, seed: int) -> torch.Tensor:
    """n base samples x0 from a dedicated generator (the same x0 for every K and every run)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *graph.dataset.shape), generator=g)
    return (z * graph.base.scale.cpu()).to(graph.device)


@torch.no_grad()
def sample(flow_map: FlowMap, x0: torch.Tensor, steps: int, chunk: int = 65_536) -> torch.Tensor:
    """K-step samples of x0 in chunks, returned on the CPU as float32."""
    flow_map.eval()
    return torch.cat([flow_map.sample(x, steps).float().cpu() for x in x0.split(chunk)])


def evaluate(graph, out_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Metric by K for the EMA flow map; writes samples/steps-K.{npy,png} when out_dir is given.

    Returns:
        {str(K): {metric name: value, "seconds": sampling wall time}}.
    """
    o = graph.spec.eval
    x0 = base_samples(graph, o.num_samples, o.seed)
    results: dict[str, dict[str, float]] = {}
    for k in o.steps:
        start = time.perf_counter()
        x = sample(graph.sampler(), x0, k)
        seconds = time.perf_counter() - start
        row = {name: float(metric(x, graph.dataset, torch.Generator().manual_seed(o.seed + 1)))
               for name, metric in graph.metrics.items()}
        row["seconds"] = seconds
        results[str(k)] = row
        if out_dir is not None:
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            np.save(out_dir / "samples" / f"steps-{k}.npy", x.numpy())
            if o.plot:
                plot(x, graph.dataset, out_dir / "samples" / f"steps-{k}.png",
                     f"{graph.spec.name}: {k} step{'s' if k > 1 else ''}  "
                     + "  ".join(f"{n}={v:.4g}" for n, v in row.items() if n != "seconds"))
    return results


def plot(x: torch.Tensor, dataset, path: Path, title: str, max_points: int = 20_000) -> None:
    """Scatter of the first two coordinates over the dataset's bounding box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = x.reshape(x.shape[0], -1)[:max_points, :2].numpy()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4, color="tab:blue", linewidths=0)
    bounds = dataset.bounds()
    if bounds is not None and len(bounds) >= 2:
        ax.set_xlim(*bounds[0])
        ax.set_ylim(*bounds[1])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
