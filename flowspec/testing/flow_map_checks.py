"""Does a flow map satisfy the conditions that define it? Residuals and check_flow_map.

A map X_{s,t} is the flow map of a velocity b exactly when, for all s <= u <= t and x,

    Lagrangian:  d/dt X_{s,t}(x) - b_t(X_{s,t}(x)) = 0
    Eulerian:    d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b_s(x) = 0
    semigroup:   X_{u,t}(X_{s,u}(x)) - X_{s,t}(x) = 0

:func:`flow_map_residuals` measures the three per sample (Euclidean norms, each a (B,) tensor; the
derivatives are forward-mode jvps: one in t, one augmented over (s, x) with tangent (1, b_s(x))).
:func:`check_flow_map` checks them on (s, t, x) drawn by hypothesis against a given exact or teacher
velocity, after the structural properties every flowspec map must have.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowspec.flowmap import FlowMap
from flowspec.jvp import Strategy, jvp
from flowspec.testing.common import F32, F64, CheckFailed, sample_times

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CONDITIONS = ("lagrangian", "eulerian", "semigroup")


def _norm(r: torch.Tensor) -> torch.Tensor:
    return r.detach().flatten(1).norm(dim=1)


def flow_map_residuals(flow_map: FlowMap, velocity: Velocity, s: torch.Tensor, t: torch.Tensor,
                       x: torch.Tensor, u: torch.Tensor | None = None, strategy: Strategy = "exact"
                       ) -> dict[str, torch.Tensor]:
    """Per-sample norms of the three residuals above, and |b_t(X_{s,t}(x))| for scale.

    Args:
        flow_map: called as ``flow_map(s, t, x)``.
        velocity: b(t, x).
        s, t: (B,) times, s <= t; u: split times (default (s + t) / 2).
        x: (B, ...) points.
        strategy: the jvp strategy ("exact", or "finite_difference" for networks without forward AD).
    Returns:
        {"lagrangian", "eulerian", "semigroup", "speed"}: each (B,), detached.
    """
    u = (s + t) / 2 if u is None else u
    with torch.no_grad():
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),), strategy=strategy)
        lag = dX_dt - velocity(t, X)
        b_s = velocity(s, x)
        _, eul = jvp(lambda ss, xx: flow_map(ss, t, xx), (s, x), (torch.ones_like(s), b_s), strategy=strategy)
        semi = flow_map(u, t, flow_map(s, u, x)) - X
        speed = velocity(t, X)
    return {"lagrangian": _norm(lag), "eulerian": _norm(eul), "semigroup": _norm(semi), "speed": _norm(speed)}


def _structure(fm: FlowMap, shape: Sequence[int], n: int, g: torch.Generator, atol: float) -> list[str]:
    """Shapes, X_{t,t} = id, d/dt X at t = s equals v_{s,s}, jvp against central differences, and
    gradients through the jvp (what the Lagrangian and Eulerian losses backpropagate)."""
    msgs: list[str] = []
    fm32, fm64 = copy.deepcopy(fm).float(), copy.deepcopy(fm).double()
    s, t = sample_times(n, g)  # the 8 edge pairs, then uniform on s <= t
    x = torch.randn(len(s), *shape, generator=g, dtype=F64)
    with torch.no_grad():
        for model, dtype in ((fm32, F32), (fm64, F64)):
            for what, out in (("X", model(s.to(dtype), t.to(dtype), x.to(dtype))),
                              ("v", model.v(s.to(dtype), t.to(dtype), x.to(dtype)))):
                if out.shape != x.shape or out.dtype != dtype:
                    msgs.append(f"{what} has shape {tuple(out.shape)}, dtype {out.dtype} for x of shape "
                                f"{tuple(x.shape)}, dtype {dtype}")
                elif not torch.isfinite(out).all():
                    msgs.append(f"{what} is not finite at the time edges ({dtype})")
        diag = fm64(t, t, x)
        if not torch.equal(diag, x):
            msgs.append(f"X_{{t,t}}(x) != x: max error {(diag - x).abs().max().item():.3g}")
    try:
        _, dX_dt = jvp(lambda tt: fm64(t, tt, x), (t,), (torch.ones_like(t),))
    except (RuntimeError, NotImplementedError) as exc:
        raise CheckFailed(f"forward-mode jvp fails ({type(exc).__name__}: {exc}); a network without "
                          "forward-AD rules needs [objective] jvp = \"finite_difference\"") from None
    with torch.no_grad():
        err = (dX_dt - fm64.velocity(t, x)).abs().max().item()
    if err > atol:
        msgs.append(f"tangent condition at s = t: d/dt X_{{s,t}} at t = s differs from v_{{s,s}} by {err:.3g}")
    inner = (s > 1e-3) & (t < 1 - 1e-3)  # central differences need room on both sides
    si, ti, xi = s[inner], t[inner], x[inner]
    ui, one = torch.randn(xi.shape, generator=g, dtype=F64), torch.ones_like(si)
    probes = {"s": (lambda ss: fm64(ss, ti, xi), (si,), (one,)), "t": (lambda tt: fm64(si, tt, xi), (ti,), (one,)),
              "x": (lambda xx: fm64(si, ti, xx), (xi,), (ui,))}
    with torch.no_grad():
        for what, (f, p, tan) in probes.items():
            exact, fd = jvp(f, p, tan)[1], jvp(f, p, tan, strategy="finite_difference", step=1e-7)[1]
            e = ((exact - fd).abs() / (1 + exact.abs())).max().item()
            if e > atol:
                msgs.append(f"jvp in {what} disagrees with central differences by {e:.3g} (> {atol:g})")
    params = [q for q in fm64.parameters() if q.requires_grad]
    if params:
        f = probes["t"][0]
        try:
            grads = torch.autograd.grad(jvp(f, (ti,), (one,))[1].pow(2).sum(), params, allow_unused=True)
        except RuntimeError as exc:
            return msgs + [f"backward through the jvp fails ({str(exc).splitlines()[0][:120]}); inside a jvp use "
                           "flowspec.jvp.attention, not torch.softmax or F.scaled_dot_product_attention"]
        fd_grads = torch.autograd.grad(jvp(f, (ti,), (one,), strategy="finite_difference", step=1e-7)[1].pow(2).sum(),
                                       params, allow_unused=True)
        pairs = [(a, b) for a, b in zip(grads, fd_grads) if a is not None and b is not None]
        e = max(((a - b).abs().max() / (1 + a.abs().max())).item() for a, b in pairs) if pairs else 0.0
        if e > 1e3 * atol:
            msgs.append(f"gradient through the jvp disagrees with central differences by {e:.3g}")
    return msgs


def _conditions(fm: FlowMap, velocity: Velocity, shape: Sequence[int], atol: float, max_examples: int,
                seed: int) -> list[str]:
    """Hypothesis draws batches of (s, t) (edges included) and x ~ 1.5 N(0, I); each condition's
    residual, relative to 1 + |b_t(X)|, must stay below atol. The worst case found is reported.
    Inside a hypothesis test of the caller's (nested @given is a health-check failure there), the
    batches are seeded draws instead: the 8 edge pairs and 8 uniform pairs each."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.control import currently_in_test_context

    from flowspec.testing.strategies import time_pairs

    worst: dict[str, tuple[float, float, float]] = {}

    def record(pair, x_seed):
        s, t = pair
        x = 1.5 * torch.randn(len(s), *shape, generator=torch.Generator().manual_seed(x_seed + seed), dtype=F64)
        res = flow_map_residuals(fm, velocity, s, t, x)
        scale = 1 + res["speed"]
        for name in CONDITIONS:
            rel = res[name] / scale
            i = int(rel.argmax())
            if rel[i].item() > worst.get(name, (-1.0,))[0]:
                worst[name] = (rel[i].item(), s[i].item(), t[i].item())

    if currently_in_test_context():
        g = torch.Generator().manual_seed(seed)
        for k in range(max_examples):
            record(sample_times(16, g), k)
    else:
        settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                 phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))(
            given(time_pairs(min_size=4, max_size=16), st.integers(0, 2 ** 31 - 1))(record))()
    labels = {"lagrangian": "Lagrangian condition dX_{s,t}/dt = b_t(X_{s,t})",
              "eulerian": "Eulerian condition dX_{s,t}/ds + grad_x X_{s,t} b_s = 0",
              "semigroup": "semigroup X_{u,t}(X_{s,u}) = X_{s,t}, u = (s + t) / 2"}
    return [f"{labels[k]} fails: residual {w[0]:.3g} (relative to 1 + |b|) > {atol:g} at (s, t) = "
            f"({w[1]:.4g}, {w[2]:.4g})" for k, w in worst.items() if w[0] > atol]


def check_flow_map(flow_map: nn.Module, shape: Sequence[int] = (2,), *, velocity: Velocity | None = None,
                   n: int = 16, seed: int = 0, atol: float = 1e-5, max_examples: int = 20) -> list[str]:
    """Check a flow map (or a network ``net(x, s, t)``, wrapped in a FlowMap), on a float64 copy:

    * structure: X_{s,t}(x) and v_{s,t}(x) shaped like x in float32 and float64, finite at the time
      edges; X_{t,t}(x) = x exactly; d/dt X_{s,t}(x) at t = s equals v_{s,s}(x); the jvps of X in s,
      t and x agree with central differences (h = 1e-7) to ``atol`` relative to 1 + |jvp|; the
      parameters' gradient of |dX/dt|^2 agrees with that through central differences to 1000 atol;
    * with ``velocity`` b (an exact or teacher velocity): v_{t,t}(x) = b_t(x) to ``atol``, and on
      ``max_examples`` batches of (s, t, x) drawn by hypothesis the Lagrangian, Eulerian and semigroup
      residuals of :func:`flow_map_residuals`, relative to 1 + |b_t(X)|, stay below ``atol``.

    Returns:
        one line naming what was checked. Raises CheckFailed listing every failing property.
    """
    fm = flow_map if isinstance(flow_map, FlowMap) else FlowMap(flow_map)
    name = type(fm).__name__ if isinstance(flow_map, FlowMap) else f"FlowMap({type(flow_map).__name__})"
    g = torch.Generator().manual_seed(seed)
    try:
        msgs = _structure(fm, shape, n, g, atol)
    except CheckFailed as exc:
        raise CheckFailed(f"{name}: {exc}") from None
    checked = "shapes, identity, tangent condition at s = t, jvp, gradients through the jvp"
    if velocity is not None:
        fm64 = copy.deepcopy(fm).double()
        t = torch.rand(n, generator=g, dtype=F64)
        x = torch.randn(n, *shape, generator=g, dtype=F64)
        with torch.no_grad():
            e = (fm64.velocity(t, x) - velocity(t, x)).abs().max().item()
        if e > atol:
            msgs.append(f"v_{{t,t}}(x) differs from the given velocity b_t(x) by {e:.3g}")
        msgs += _conditions(fm64, velocity, shape, atol, max_examples, seed)
        checked += ", v_{t,t} = b_t, Lagrangian, Eulerian, semigroup"
    if msgs:
        raise CheckFailed("\n".join(f"{name}: {m}" for m in msgs))
    return [f"{name}: {checked}"]


__all__ = ["CONDITIONS", "check_flow_map", "flow_map_residuals"]
