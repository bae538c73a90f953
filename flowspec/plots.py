"""The pictures of a run folder (matplotlib's object API on the Agg canvas: no pyplot, no global
backend): ``samples/steps-K.png`` (a 2-D histogram of the samples beside the exact density, or the
data's histogram where there is no closed form; an image grid for image data), ``loss.png`` (each
loss term against the step) and ``nfe.png`` (each metric against the network evaluations per sample,
the flow map's K-step rows beside the ODE baselines). Every file is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from flowspec.atomic import atomic_write

#: record keys of metrics.jsonl that are not loss terms
NOT_TERMS = frozenset({"step", "lr", "grad_norm", "steps_per_sec", "elapsed", "nonfinite_skipped"})
#: eval row keys that are not metrics
NOT_METRICS = frozenset({"nfe", "seconds", "error"})


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def image_grid(x: torch.Tensor, columns: int = 8) -> np.ndarray:
    """The first columns^2 images (N, C, H, W) in [-1, 1] as one (rows H, columns W, C) array in [0, 1]."""
    x = ((x[: columns * columns].float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = x.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, columns)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def grid_plot(x: torch.Tensor, path: Path, title: str, columns: int = 8) -> None:
    """Save a grid of the first columns^2 images (N, C, H, W) in [-1, 1] with a title."""
    grid = image_grid(x, columns)
    fig = _figure(5, 5.3)
    ax = fig.add_subplot()
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _box(dataset, pts: torch.Tensor, ref: torch.Tensor) -> list[tuple[float, float]]:
    """(lo, hi) of the first two coordinates: the dataset's bounding box, else the 0.5% and 99.5%
    quantiles of the data and the samples together, padded by 5%."""
    bounds = dataset.bounds()
    if bounds is not None and len(bounds) >= 2:
        return [tuple(map(float, b)) for b in bounds[:2]]  # type: ignore[misc]
    both = torch.cat([pts, ref]).double()
    q = torch.quantile(both[:200_000], torch.tensor([0.005, 0.995], dtype=torch.float64), dim=0)
    pad = 0.05 * (q[1] - q[0]).clamp_min(1e-6)
    return [(float(q[0, d] - pad[d]), float(q[1, d] + pad[d])) for d in range(2)]


def density_plot(x: torch.Tensor, dataset, path: Path, title: str, bins: int | None = None) -> str:
    """A 2-D histogram of the samples' first two coordinates beside the exact cell probabilities of
    the data (``dataset.cell_mass``, 2-D data) or, without a closed form, the histogram of as many
    data samples; one colour scale for both, ``bins`` per axis (default: about 8 samples a cell,
    20 to 100). Images (N, C, H, W) get a grid instead. Returns what is drawn beside the samples:
    "exact density", "data", or "grid" (images, drawn alone)."""
    bins = bins or int(min(100, max(20, math.sqrt(x.shape[0] / 8))))
    if x.ndim == 4:
        grid_plot(x, path, title)
        return "grid"
    pts = x.reshape(x.shape[0], -1)[:, :2].double().cpu()
    if pts.shape[1] < 2:
        pts = torch.cat([pts, torch.zeros_like(pts)], 1)
    data = dataset.sample(pts.shape[0], torch.Generator().manual_seed(0)).reshape(pts.shape[0], -1)[:, :2].double()
    if data.shape[1] < 2:
        data = torch.cat([data, torch.zeros_like(data)], 1)
    box = _box(dataset, pts, data)
    edges = [torch.linspace(lo, hi, bins + 1, dtype=torch.float64) for lo, hi in box]

    def histogram(p: torch.Tensor) -> tuple[np.ndarray, float]:
        h = np.histogram2d(p[:, 0].numpy(), p[:, 1].numpy(), bins=[e.numpy() for e in edges])[0]
        return h / max(len(p), 1), 1 - h.sum() / max(len(p), 1)

    mine, outside = histogram(pts)
    exact = dataset.cell_mass(edges) if tuple(dataset.shape) == (2,) else None
    ref, what = (exact.numpy(), "exact density") if exact is not None else (histogram(data)[0], "data")
    from matplotlib.colors import PowerNorm

    norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(mine.max()), float(ref.max()), 1e-12))
    fig = _figure(9, 4.6)
    extent = (*box[0], *box[1])
    for i, (h, label) in enumerate(((mine, f"samples ({outside:.1%} outside)"), (ref, what))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(h.T, origin="lower", extent=extent, cmap="magma", norm=norm, interpolation="nearest",
                  aspect="auto")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return what


def loss_plot(records: list[dict], path: Path, title: str) -> bool:
    """Each loss term of the training records against the step (log y; symmetric log when a term
    is not positive). False (nothing written) when there is no training record."""
    rows = [r for r in records if "eval" not in r]
    terms = list(dict.fromkeys(k for r in rows for k, v in r.items()
                               if k not in NOT_TERMS and isinstance(v, (int, float)) and not isinstance(v, bool)))
    if not rows or not terms:
        return False
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    positive = True
    for term in terms:
        pairs = [(r["step"], r[term]) for r in rows if isinstance(r.get(term), (int, float))]
        positive &= all(v > 0 for _, v in pairs)
        ax.plot([s for s, _ in pairs], [v for _, v in pairs], label=term, linewidth=1.2, marker="." if len(pairs) < 30
                else None)
    if positive:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss term")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def nfe_plot(result: dict, path: Path, title: str) -> bool:
    """One panel per metric of an eval.json-shaped ``result`` ({"steps": {K: row}, "ode": {label:
    row}}): the flow map's rows against NFE = K as a line, each ODE baseline as a marker (log x).
    False (nothing written) when no row has a metric."""
    steps, ode = result.get("steps", {}) or {}, result.get("ode", {}) or {}
    metrics = list(dict.fromkeys(k for row in [*steps.values(), *ode.values()] for k, v in row.items()
                                 if k not in NOT_METRICS and _finite(v)))
    if not metrics:
        return False
    cols = min(len(metrics), 3)
    rows_n = -(-len(metrics) // cols)
    fig = _figure(4.2 * cols, 3.4 * rows_n + 0.4)
    for i, name in enumerate(metrics):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        pts = sorted((row["nfe"], row[name]) for row in steps.values()
                     if _finite(row.get(name)) and _finite(row.get("nfe")))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.5, label="flow map (K steps)")
        for label, row in ode.items():
            if _finite(row.get(name)) and _finite(row.get("nfe")):
                ax.plot([row["nfe"]], [row[name]], marker="s", linestyle="none", label=f"ODE {label}")
        ax.set_xscale("log")
        ticks = sorted({int(r["nfe"]) for r in [*steps.values(), *ode.values()] if _finite(r.get("nfe"))})
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("NFE (network evaluations per sample)", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def run_plots(run_dir: Path, title: str) -> list[Path]:
    """loss.png and nfe.png of a run folder, from its metrics.jsonl and eval.json; the files written."""
    written = []
    from flowspec.runs import read_records

    if loss_plot(read_records(run_dir), run_dir / "loss.png", f"{title}: training loss"):
        written.append(run_dir / "loss.png")
    ev = run_dir / "eval.json"
    result = json.loads(ev.read_text(encoding="utf-8")) if ev.is_file() else {}
    if nfe_plot(result, run_dir / "nfe.png", f"{title}: metrics against NFE (step {result.get('step')})"):
        written.append(run_dir / "nfe.png")
    return written
