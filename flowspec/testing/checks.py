"""Property checks for objectives, interpolants, flow maps, datasets and metrics.

Each check raises :class:`CheckFailed` (an AssertionError, so pytest shows it as a test failure)
listing every property that does not hold, or returns the list of what it checked.

* :func:`check_objective` (flowspec.testing.objective_checks): an objective trains toward the exact
  flow map of Gaussian targets that mix coordinates, for every distillation target it declares;
  :func:`check_penalty`: its per-sample loss vanishes only at r = 0.
* :func:`check_interpolant`: boundary conditions and derivatives against finite differences.
* :func:`check_flow_map`: identity on the diagonal, the tangent condition, jvp against central
  differences.
* :func:`check_dataset`, :func:`check_metric`: the Dataset and Metric contracts.
"""

from __future__ import annotations

import math

import torch

from flowspec.interpolants import Interpolant
from flowspec.testing.common import F32, F64, ZERO_TOL, CheckFailed, default_oracles, edge_times, zero_tolerance
from flowspec.testing.flow_map_checks import check_flow_map, flow_map_residuals
from flowspec.testing.objective_checks import check_objective, check_penalty

# -- interpolants ------------------------------------------------------------------------------------

def check_interpolant(interpolant: Interpolant, *, n: int = 201, atol: float = 1e-6) -> list[str]:
    """Check a schedule against docs/math.md, "Stochastic interpolant".

    * boundary conditions alpha_0 = 1, beta_0 = 0, alpha_1 = 0, beta_1 = 1 (to 1e-12 in float64);
    * coefficients have shape (B,), keep the dtype (float32 and float64) and are finite on [0, 1];
    * alpha_t^2 + beta_t^2 > 0 on [0, 1] (I_t never collapses to a point);
    * alphadot, betadot against central differences (h = 1e-6, float64) on n points in
      [1e-3, 1 - 1e-3] and second-order one-sided differences at t = 0 and t = 1, to ``atol``
      relative to 1 + |derivative|;
    * interpolate(t, x0, x1) = (alpha_t x0 + beta_t x1, alphadot_t x0 + betadot_t x1), I_0 = x0,
      I_1 = x1, on (B, 2, 3) samples.

    Raises:
        CheckFailed: listing every failing property.
    """
    msgs: list[str] = []
    name = type(interpolant).__name__
    ends = interpolant.coefficients(torch.tensor([0.0, 1.0], dtype=F64))
    want = {"alpha": (1.0, 0.0), "beta": (0.0, 1.0)}
    for key, (w0, w1) in want.items():
        got = getattr(ends, key).tolist()
        if abs(got[0] - w0) > 1e-12 or abs(got[1] - w1) > 1e-12:
            msgs.append(f"{key}_0, {key}_1 = {got[0]!r}, {got[1]!r} (must be {w0}, {w1})")
    for dtype in (F32, F64):
        t = torch.linspace(0, 1, n, dtype=dtype)
        c = interpolant.coefficients(t)
        for key in ("alpha", "beta", "alpha_dot", "beta_dot"):
            val = getattr(c, key)
            if val.shape != (n,) or val.dtype != dtype:
                msgs.append(f"{key} has shape {tuple(val.shape)} and dtype {val.dtype} for times of shape "
                            f"({n},) and dtype {dtype}")
            elif not torch.isfinite(val).all():
                msgs.append(f"{key} is not finite at t = {t[~torch.isfinite(val)].tolist()[:5]} ({dtype})")
    t = torch.linspace(0, 1, n, dtype=F64)
    c = interpolant.coefficients(t)
    if (c.alpha ** 2 + c.beta ** 2).min() <= 0:
        msgs.append("alpha_t = beta_t = 0 somewhere on [0, 1]")
    h = 1e-6
    inner = torch.linspace(1e-3, 1 - 1e-3, n, dtype=F64)
    plus, minus = interpolant.coefficients(inner + h), interpolant.coefficients(inner - h)
    at = interpolant.coefficients(inner)
    edges = torch.tensor([0.0, 1.0], dtype=F64)
    sign = torch.tensor([1.0, -1.0], dtype=F64)
    e0, e1, e2 = (interpolant.coefficients(edges + sign * k * h) for k in (0, 1, 2))
    for key in ("alpha", "beta"):
        fd = (getattr(plus, key) - getattr(minus, key)) / (2 * h)
        exact = getattr(at, f"{key}_dot")
        err = ((fd - exact).abs() / (1 + exact.abs())).max().item()
        if err > atol:
            i = int(((fd - exact).abs() / (1 + exact.abs())).argmax())
            msgs.append(f"{key}_dot disagrees with central differences: at t = {inner[i].item():.4f} "
                        f"{exact[i].item():.8g} vs {fd[i].item():.8g}")
        fd_edge = sign * (-3 * getattr(e0, key) + 4 * getattr(e1, key) - getattr(e2, key)) / (2 * h)
        exact_edge = getattr(e0, f"{key}_dot")
        if ((fd_edge - exact_edge).abs() / (1 + exact_edge.abs())).max().item() > 1e-4:
            msgs.append(f"{key}_dot at t = 0, 1 is {exact_edge.tolist()}, one-sided differences give "
                        f"{fd_edge.tolist()} (wrong, or not smooth at the edge)")
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(n, 2, 3, generator=g, dtype=F64), torch.randn(n, 2, 3, generator=g, dtype=F64)
    it, dit = interpolant.interpolate(t, x0, x1)
    want_i = c.alpha[:, None, None] * x0 + c.beta[:, None, None] * x1
    want_d = c.alpha_dot[:, None, None] * x0 + c.beta_dot[:, None, None] * x1
    if (it.shape != x0.shape or not torch.allclose(it, want_i, atol=1e-12)
            or not torch.allclose(dit, want_d, atol=1e-12)):
        msgs.append("interpolate(t, x0, x1) is not (alpha_t x0 + beta_t x1, alphadot_t x0 + betadot_t x1)")
    elif not (torch.allclose(it[0], x0[0], atol=1e-12) and torch.allclose(it[-1], x1[-1], atol=1e-12)):
        msgs.append("I_0 != x0 or I_1 != x1")
    if msgs:
        raise CheckFailed("\n".join(f"{name}: {m}" for m in msgs))
    return [f"{name}: boundary, shapes, dtypes, derivatives, interpolate"]


# -- datasets and metrics ----------------------------------------------------------------------------

def check_dataset(dataset, *, n: int = 100_000, seed: int = 0) -> list[str]:
    """Check a Dataset against its base class's contract (flowspec.data.base):

    * ``sample(k, generator)`` is (k, *shape), float32, on the CPU, finite, and the same for the
      same seed (k = 1 and k = n);
    * ``std()`` has shape ``shape`` and matches the std of n samples to 3% (+ 1e-3);
    * ``bounds()``, if given, has one (lo, hi) with lo < hi per dimension and holds >= 99% of samples;
    * ``cell_mass(edges)``, if given, on a 20 x 20 grid over the bounds: non-negative, total <= 1,
      and within total variation 0.02 of the histogram of n samples.

    Raises:
        CheckFailed: listing every failing property.
    """
    msgs: list[str] = []
    name = type(dataset).__name__
    shape = tuple(dataset.shape)
    for k in (1, n):
        a = dataset.sample(k, torch.Generator().manual_seed(seed))
        b = dataset.sample(k, torch.Generator().manual_seed(seed))
        if tuple(a.shape) != (k, *shape) or a.dtype != F32 or a.device.type != "cpu":
            msgs.append(f"sample({k}) is {tuple(a.shape)} {a.dtype} on {a.device} (must be ({k}, *{shape}) "
                        "float32 on the CPU)")
            continue
        if not torch.equal(a, b):
            msgs.append(f"sample({k}) differs between two generators with the same seed")
        if not torch.isfinite(a).all():
            msgs.append(f"sample({k}) is not finite")
    if msgs:
        raise CheckFailed("\n".join(f"{name}: {m}" for m in msgs))
    x = a.double()
    std = dataset.std()
    if tuple(std.shape) != shape:
        msgs.append(f"std() has shape {tuple(std.shape)} (must be {shape})")
    elif ((std.double() - x.std(0)).abs() > 0.03 * x.std(0) + 1e-3).any():
        msgs.append(f"std() = {std.flatten().tolist()[:4]} but samples give {x.std(0).flatten().tolist()[:4]}")
    bounds = dataset.bounds()
    if bounds is not None:
        flat = x.reshape(n, -1)
        if len(bounds) != flat.shape[1] or any(lo >= hi for lo, hi in bounds):
            msgs.append(f"bounds() = {bounds} is not one (lo, hi), lo < hi, per dimension")
        else:
            lo = torch.tensor([b[0] for b in bounds], dtype=F64)
            hi = torch.tensor([b[1] for b in bounds], dtype=F64)
            inside = ((flat >= lo) & (flat <= hi)).all(1).double().mean().item()
            if inside < 0.99:
                msgs.append(f"only {inside:.3f} of the samples lie inside bounds() = {bounds}")
            if len(bounds) == 2:
                edges = [torch.linspace(b[0], b[1], 21, dtype=F64) for b in bounds]
                p = dataset.cell_mass(edges)
                if p is not None:
                    q = torch.histogramdd(flat, bins=edges).hist / n
                    tv = 0.5 * (p - q).abs().sum().item()
                    if p.shape != (20, 20) or (p < 0).any() or p.sum() > 1 + 1e-9:
                        msgs.append(f"cell_mass is not a (20, 20) sub-probability (shape {tuple(p.shape)}, "
                                    f"total {p.sum().item():.4f})")
                    elif tv > 0.02:
                        msgs.append(f"cell_mass differs from the histogram of {n} samples: total variation {tv:.3f}")
    if msgs:
        raise CheckFailed("\n".join(f"{name}: {m}" for m in msgs))
    return [f"{name}: sample, std, bounds, cell_mass"]


def check_metric(metric, dataset, *, n: int = 1000, seed: int = 0) -> list[str]:
    """Check a Metric on a dataset: it returns a finite float on samples (n, *shape) float32, the
    same value for the same generator seed, and tells data from data moved by one std (shifted
    and scaled by 1.5): better on fresh data samples than on the moved ones, in the direction
    ``metric.lower_is_better`` says.

    Raises:
        CheckFailed: listing every failing property.
    """
    msgs: list[str] = []
    name = type(metric).__name__
    data = dataset.sample(n, torch.Generator().manual_seed(seed + 100))
    std = dataset.std().to(data.dtype)
    moved = 1.5 * (data - data.mean(0)) + data.mean(0) + std
    good = metric(data, dataset, torch.Generator().manual_seed(seed))
    again = metric(data, dataset, torch.Generator().manual_seed(seed))
    bad = metric(moved, dataset, torch.Generator().manual_seed(seed))
    if not all(isinstance(v, float) and math.isfinite(v) for v in (good, bad)):
        msgs.append(f"values must be finite floats, got {good!r} and {bad!r}")
    else:
        if good != again:
            msgs.append(f"not reproducible with the same generator seed: {good} then {again}")
        better = good < bad if metric.lower_is_better else good > bad
        if not better:
            msgs.append(f"does not prefer data ({good:.4g}) to data moved by one std ({bad:.4g}) "
                        f"(lower_is_better = {metric.lower_is_better})")
    if msgs:
        raise CheckFailed("\n".join(f"{name} on {type(dataset).__name__}: {m}" for m in msgs))
    return [f"{name} on {type(dataset).__name__}: finite, reproducible, prefers the data"]


__all__ = ["CheckFailed", "ZERO_TOL", "check_dataset", "check_flow_map", "check_interpolant", "check_metric",
           "check_objective", "check_penalty", "default_oracles", "edge_times", "flow_map_residuals",
           "zero_tolerance"]
