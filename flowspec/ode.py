"""ODE baselines and ground-truth flow maps: integrating a velocity with torchdiffeq, NFE counted.

The probability flow xdot = b_t(x) is integrated from s to t per sample (s, t of shape (B,)) through the
reparameterization tau in [0, 1], time = s + tau (t - s):

    dy/dtau = (t - s) b_{s + tau (t - s)}(y),   y(0) = x,   y(1) = X_{s,t}(x)

so one solve handles a batch of different (s, t) pairs (sampling is s = 0, t = 1). Fixed-grid solvers
(euler, midpoint, heun = Heun's second-order method, rk4 = the 3/8 rule) take K uniform steps in tau;
dopri5 is adaptive with rtol/atol (the error norm is torchdiffeq's RMS over the whole batch). The
number of function evaluations (NFE, one call of b on the whole batch) is counted, not predicted:
K, 2K, 2K, 4K for the fixed-grid methods.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from flowspec.interpolants import expand_as

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Solver = Literal["euler", "midpoint", "heun", "rk4", "dopri5"]
_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4", "dopri5": "dopri5"}
#: tolerance of ground-truth flow maps (float64 dopri5)
TRUTH_TOL = 1e-6
#: time warp kappa of ground-truth solves
TRUTH_WARP = 12.0


class ODEOptions(BaseModel):
    """One ODE baseline: a solver for the velocity of the model's diagonal (or the teacher's, or the
    exact one of an analytic target)."""

    model_config = ConfigDict(extra="forbid")
    solver: Solver = Field("dopri5", description="euler | midpoint | heun | rk4 (K uniform steps) | dopri5 (adaptive)")
    steps: int = Field(16, ge=1, description="K, for the fixed-grid solvers")
    rtol: float = Field(1e-5, gt=0, description="dopri5 relative tolerance")
    atol: float = Field(1e-5, gt=0, description="dopri5 absolute tolerance")
    velocity: Literal["model", "teacher", "exact"] = Field(
        "model", description="model: the EMA diagonal v_{t,t}; teacher: the [teacher] velocity; "
        "exact: the dataset's closed-form velocity")

    def label(self) -> str:
        """Row name, e.g. ``euler K=16`` or ``dopri5 tol=1e-05`` (``exact ``/``teacher `` prefixed)."""
        what = "" if self.velocity == "model" else f"{self.velocity} "
        if self.solver == "dopri5":
            tol = f"{self.rtol:g}" if self.rtol == self.atol else f"{self.rtol:g}/{self.atol:g}"
            return f"{what}dopri5 tol={tol}"
        return f"{what}{self.solver} K={self.steps}"


def integrate(velocity: Velocity, x: torch.Tensor, s: torch.Tensor | float = 0.0,
              t: torch.Tensor | float = 1.0, solver: Solver = "dopri5", steps: int = 16,
              rtol: float = 1e-5, atol: float = 1e-5, warp: float = 0.0) -> tuple[torch.Tensor, int]:
    """x_t from x_s = x by the probability flow of ``velocity``.

    Args:
        velocity: b(t, x) with t of shape (B,) and x of shape (B, ...).
        x: start points, (B, ...).
        s, t: start and end times, (B,) tensors or floats.
        solver, steps, rtol, atol: see :class:`ODEOptions`.
        warp: kappa > 0 integrates in a warped time, time = s + (t - s) w(tau) with
            w(tau) = (1 - exp(-kappa tau)) / (1 - exp(-kappa)), which takes steps geometrically closer
            to t (used for ground truth: an exact velocity is stiff as t -> 1 near the edge of a
            compact support, where b ~ dist / (1 - t)). 0: the uniform time of the baselines.
    Returns:
        (x_t shaped like x, NFE).
    """
    from torchdiffeq import odeint

    if solver not in _METHODS:
        raise ValueError(f"unknown solver {solver!r} (valid: {', '.join(_METHODS)})")
    # the state and the time run in float64 whatever the velocity's dtype: torchdiffeq keeps time in
    # the state's dtype, and in float32 the adaptive solver's last step onto tau = 1 can underflow
    dtype, f64 = x.dtype, torch.float64
    n = x.shape[0]
    s = torch.as_tensor(s, dtype=f64, device=x.device).expand(n)
    t = torch.as_tensor(t, dtype=f64, device=x.device).expand(n)
    y0 = x.to(f64)
    dt = expand_as(t - s, y0)
    nfe = 0

    def f(tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        # adaptive steps never ask for a time outside [s, t] (an analytic velocity can be singular
        # beyond t = 1)
        tau = tau.to(f64).clamp(0.0, 1.0)
        if warp > 0:
            norm = -math.expm1(-warp)
            w, dw = -torch.expm1(-warp * tau) / norm, warp * torch.exp(-warp * tau) / norm
        else:
            w, dw = tau, torch.ones((), dtype=f64, device=x.device)
        return dw * dt * velocity((s + w * (t - s)).to(dtype), y.to(dtype)).to(f64)

    if solver == "dopri5":
        grid = torch.tensor([0.0, 1.0], dtype=f64, device=x.device)
        # step_t: the last step lands exactly on tau = 1 instead of overshooting and interpolating
        opts = dict(rtol=rtol, atol=atol, options={"step_t": grid[1:]})
    else:
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=f64, device=x.device)
        opts = {}
    with torch.no_grad():
        y = odeint(f, y0, grid, method=_METHODS[solver], **opts)[-1].to(dtype)
    return y, nfe


class TeacherMapOptions(BaseModel):
    """How a frozen teacher's two-stage map is integrated (progressive distillation and shortcut
    models with target = "teacher")."""

    model_config = ConfigDict(extra="forbid")
    solver: Literal["dopri5", "rk4"] = Field(
        "dopri5", description="dopri5: adaptive, every sample to the tolerance (max norm); rk4: K fixed steps")
    tol: float = Field(1e-7, gt=0, description="dopri5 rtol = atol, per sample and coordinate (floored at "
                       "4 eps of the teacher's dtype)")
    steps: int = Field(16, ge=1, description="K, rk4 steps per map (4K teacher evaluations)")


def map_velocity(velocity: Velocity, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                 options: TeacherMapOptions | None = None, eval_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, int]:
    """The map velocity v_{s,t}(x) = (X_{s,t}(x) - x) / (t - s) of ``velocity``'s own flow, per sample.

    Integrated without dividing by t - s, so it is exact on the diagonal (v_{s,s} = b_s) and loses no
    digits for short intervals: with h = t - s (B,) and the normalised time tau in [0, 1], the mean
    velocity z(tau) = (y(tau) - x) / h of the path y(tau) = X_{s, s + tau h}(x) solves

        dz/dtau = b_{s + tau h}(x + h z),   z(0) = 0,   z(1) = v_{s,t}(x)

    one torchdiffeq solve for the whole batch of (s, t) pairs, state in float64, ``velocity`` called in
    ``eval_dtype`` (default x's dtype; float64 for a closed-form velocity, whose float32 rounding would
    otherwise bound the accuracy at a few 1e-7) under no_grad. dopri5 controls every sample's error (max
    norm over the batch, rtol = atol = tol): on Gaussian targets the error of v stays within 10 tol at
    60-150 evaluations of b on the batch; rk4 takes K steps (4K evaluations; error ~ K^-4, 1e-6 at
    K = 16 for a well-scaled Gaussian, 1e-3 when the data std is 4 times the base's).

    Args:
        velocity: b(t, x), t (B,), x (B, ...).
        s, t: (B,) start and end times.
        x: (B, ...) start points.
    Returns:
        (v_{s,t}(x) shaped like x in x's dtype, NFE: evaluations of b on the batch).
    """
    from torchdiffeq import odeint

    o = options or TeacherMapOptions()
    dtype, f64 = eval_dtype or x.dtype, torch.float64
    s64, h = s.to(f64), (t - s).to(f64)
    x64 = x.detach().to(f64)
    hx = expand_as(h, x64)
    nfe = 0

    def f(tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        r = s64 + tau.to(f64).clamp(0.0, 1.0) * h
        return velocity(r.to(dtype), (x64 + hx * z).to(dtype)).to(f64)

    z0 = torch.zeros_like(x64)
    with torch.no_grad():
        if o.solver == "dopri5":
            grid = torch.tensor([0.0, 1.0], dtype=f64, device=x.device)
            tol = max(o.tol, 4 * torch.finfo(dtype).eps)
            z = odeint(f, z0, grid, method="dopri5", rtol=tol, atol=tol,
                       options={"step_t": grid[1:], "norm": lambda y: y.abs().max()})[-1]
        else:
            grid = torch.linspace(0.0, 1.0, o.steps + 1, dtype=f64, device=x.device)
            z = odeint(f, z0, grid, method="rk4")[-1]
    return z.to(x.dtype), nfe


def sample(velocity: Velocity, x0: torch.Tensor, options: ODEOptions, chunk: int = 65_536
           ) -> tuple[torch.Tensor, int, float]:
    """ODE samples X_{0,1}(x0) in chunks: (samples on the CPU as float32, NFE (largest over chunks),
    wall seconds). dopri5 on an exact velocity runs in the warped time of the ground truth (an exact
    velocity of a compactly supported target is stiff as t -> 1); every other row in uniform time."""
    start = time.perf_counter()
    outs, nfe = [], 0
    for x in x0.split(chunk):
        warp = TRUTH_WARP if options.velocity == "exact" and options.solver == "dopri5" else 0.0
        y, k = integrate(velocity, x, 0.0, 1.0, options.solver, options.steps, options.rtol, options.atol,
                         warp=warp)
        outs.append(y.float().cpu())
        nfe = max(nfe, k)
    return torch.cat(outs), nfe, time.perf_counter() - start


def true_flow_map(velocity: Velocity, s: torch.Tensor | float, t: torch.Tensor | float,
                  x: torch.Tensor, tol: float = TRUTH_TOL, warp: float = TRUTH_WARP) -> torch.Tensor:
    """Ground-truth X_{s,t}(x): dopri5 in float64 at rtol = atol = ``tol`` in warped time (see
    :func:`integrate`); returned in x's dtype."""
    y, _ = integrate(velocity, x.double(), torch.as_tensor(s).double(), torch.as_tensor(t).double(),
                     "dopri5", rtol=tol, atol=tol, warp=warp)
    return y.to(x.dtype)


def time_grid_pairs(points: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs s < t of the uniform grid of ``points`` times on [0, 1] (for points = 5: 10 pairs,
    (0, 1) among them), as two (P,) float64 tensors."""
    g = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    i, j = torch.triu_indices(points, points, offset=1)
    return g[i], g[j]


@torch.no_grad()
def flow_map_error(flow_map, truth: Velocity, x0: torch.Tensor, x1: torch.Tensor, interpolant,
                   points: int = 5) -> dict[str, float]:
    """Mean squared error of a learned map against the true one (docs/math.md, "Exact oracles").

    For every pair (s, t), s < t, of a uniform grid of ``points`` times and each of the N pairs
    (x0, x1): x = I_s(x0, x1), error |X_{s,t}(x) - X^true_{s,t}(x)|^2 (summed over dimensions).

    Args:
        flow_map: the learned map, called as ``flow_map(s, t, x)``.
        truth: the exact velocity b(t, x) (integrated by :func:`true_flow_map`).
        x0, x1: base and data samples, (N, ...).
        interpolant: the run's interpolant.
    Returns:
        {"grid": mean over pairs and samples, "0-1": the pair (0, 1) alone}.
    """
    ss, tt = time_grid_pairs(points)
    n = x0.shape[0]
    s = ss.repeat_interleave(n).to(x0.device)
    t = tt.repeat_interleave(n).to(x0.device)
    a0, a1 = x0.double().repeat(len(ss), *([1] * (x0.dim() - 1))), x1.double().repeat(len(ss), *([1] * (x1.dim() - 1)))
    xs, _ = interpolant.interpolate(s, a0, a1)
    true = true_flow_map(truth, s, t, xs)
    dtype = next(iter(flow_map.parameters())).dtype if hasattr(flow_map, "parameters") else x0.dtype
    learned = flow_map(s.to(dtype), t.to(dtype), xs.to(dtype)).double()
    err = (learned - true).pow(2).flatten(1).sum(1).reshape(len(ss), n).mean(1)
    one = int(((ss == 0) & (tt == 1)).nonzero()[0, 0])
    return {"grid": float(err.mean()), "0-1": float(err[one])}
