"""check_objective: does an objective train toward the exact flow map? (and check_penalty).

The flow map under test is :class:`~flowspec.testing.families.AffineFlowMap`: an oracle's exact map
plus a dense, time-dependent correction (t - s)(A(s, t)(x - m) + a(s, t)) with parameters theta,
theta* = 0 the exact map. For each distillation target, oracle and dtype the objective's off-diagonal
loss is evaluated on a batch whose times include the edges. The teacher of target = "teacher" knows
only b_t: the analytic velocity (every other oracle) or a frozen network whose diagonal is b_t (the
rest). The checks are:

* zero at the exact map: the residual r (RMS, relative to its change per unit of perturbation,
  |r(theta* + d) - r(theta*)| / eps) vanishes, and where it does not the gradient is reported too
  (relative to its change, likewise), to
  :func:`~flowspec.testing.common.zero_tolerance` of the dtype and jvp strategy (plus 10 times
  ``teacher_tol`` where the objective integrates a teacher's ODE to that tolerance). With the conditional
  target r vanishes only in conditional expectation, so only the expected gradient is checked, on
  antithetic pairs (same I_s, opposite conditional noise);
* positive off it: the loss at theta* + d exceeds the loss at theta* (not checked with the
  conditional target, whose loss value is dominated by the noise of dI_s/ds), and a gradient
  reaches theta;
* descent (float64; with the conditional target on at least 2048 antithetic pairs, since a
  noise-dependent weight leaves Monte-Carlo error in the pair average): at theta* + d for 4 random
  directions d (each entry of (A, a) moved by about
  eps = 0.05), the training gradient g satisfies <g, d> > 0: a step of gradient descent moves the map
  back toward the exact map. A stationary but repelling exact map (a stop-gradient on the wrong
  side of the residual) fails here;
* convergence (float64, the first oracle, a batch of at least 256): 100 Adam steps from theta* + d
  reduce the mean squared map error E |v_theta - v*|^2 to below a quarter of its start (sound
  objectives reach 1e-4 to 1e-2 of it; a repelling one grows it a thousandfold);
* the diagonal (flow matching) term: its expected gradient vanishes at the exact velocity and not at
  a perturbed one (antithetic pairs, :class:`~flowspec.testing.PerturbedFlowMap`'s diagonal directions);
* :func:`check_penalty`: the per-sample loss vanishes at r = 0 and only there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from flowspec.objectives.base import Batch, Objective, OffDiagonal
from flowspec.testing.common import (
    F32,
    F64,
    CheckFailed,
    antithetic,
    default_oracles,
    describe_oracle,
    edge_times,
    rms,
    sample_times,
    zero_tolerance,
)
from flowspec.testing.families import AffineFlowMap
from flowspec.testing.oracles import PerturbedFlowMap
from flowspec.testing.teachers import kit_teacher as _teacher

EPS = 0.05  #: size of the perturbations of (A, a)
DIRECTIONS = 4  #: random directions of the descent check
GD_STEPS = 100  #: Adam steps of the convergence check
CONDITIONAL_BATCH = 2048  #: pairs of the descent and convergence checks with target = "conditional"
GD_BATCH = 256  #: at least this many samples in the convergence check (a small batch is ill-conditioned)
GD_FACTOR = 0.25  #: the map error must fall below this fraction of its start


def _objective_for(objective: Objective | type[Objective], target: str) -> Objective:
    if isinstance(objective, type):
        return objective(objective.Options(target=target))
    return type(objective)(objective.options.model_copy(update={"target": target}))


class _Case:
    """One (objective, target, oracle, dtype): the family, the batch, and evaluations at theta."""

    def __init__(self, obj: Objective, target: str, oracle, dtype: torch.dtype, n: int, seed: int,
                 frozen_network: bool = False):
        self.obj, self.target, self.oracle, self.dtype, self.seed = obj, target, oracle, dtype, seed
        self.n, self.frozen_network = n, frozen_network
        g = torch.Generator().manual_seed(seed)
        self.fm = AffineFlowMap(oracle, oracle.dim, seed=seed)
        self.teacher = _teacher(target, self.fm, oracle, frozen_network)
        x0, x1 = oracle.sample_base(n, g), oracle.sample_data(n, g)
        s, t = sample_times(n, g)
        if target == "conditional":
            x0, x1 = antithetic(oracle, s, x0, x1)
            s, t = torch.cat([s, s]), torch.cat([t, t])
        self.s, self.t = s.to(dtype), t.to(dtype)
        self.batch = Batch(x0.to(dtype), x1.to(dtype))
        self.generator = g

    def _set(self, theta: torch.Tensor | None) -> torch.Generator:
        """Set theta (None: theta* = 0); a fresh generator for the objective, the same every time."""
        with torch.no_grad():
            self.fm.theta.copy_(theta if theta is not None else torch.zeros_like(self.fm.theta))
        return torch.Generator().manual_seed(self.seed + 1)

    def residual(self, theta=None) -> torch.Tensor:
        generator = self._set(theta)
        sample = OffDiagonal.at(self.oracle.interpolant, self.s, self.t, self.batch.x0, self.batch.x1, generator)
        return self.obj.residual(self.fm, self.teacher, sample).detach()

    def loss_and_grad(self, theta=None) -> tuple[float, torch.Tensor | None]:
        batch = Batch(self.batch.x0, self.batch.x1, self._set(theta))
        out = self.obj.loss_at(self.fm, self.oracle.interpolant, self.teacher, batch, self.s, self.t, 0)
        if not out.loss.requires_grad:
            return out.loss.item(), None
        (grad,) = torch.autograd.grad(out.loss, [self.fm.theta], allow_unused=True)
        return out.loss.item(), grad

    def map_error(self, theta) -> float:
        """E |v_theta - v*|^2 over the batch's off-diagonal points."""
        with torch.no_grad():
            self.fm.theta.copy_(theta)
            xs, _ = self.oracle.interpolant.interpolate(self.s, self.batch.x0, self.batch.x1)
            return float((self.fm.v(self.s, self.t, xs) - self.oracle.v(self.s, self.t, xs)).double()
                         .pow(2).sum(1).mean())


def _norm(g: torch.Tensor | None) -> float:
    return 0.0 if g is None else float(g.norm())


def _where(case: _Case, r: torch.Tensor) -> str:
    i = int(r.double().pow(2).flatten(1).sum(1).argmax())
    return f"largest at (s, t) = ({case.s[i].item():.3g}, {case.t[i].item():.3g})"


def _off_diagonal(case: _Case) -> tuple[list[str], str]:
    """Zero at the exact map, positive off it, and (float64) descent; (failures, summary)."""
    msgs: list[str] = []
    o = case.obj.options
    tol = zero_tolerance(case.dtype, o.jvp)
    if case.target == "teacher" and getattr(o, "teacher_solver", "") == "dopri5":
        tol += 10 * getattr(o, "teacher_tol")  # noqa: B009  (the progressive options': an ODE solve to it)
    d = case.fm.direction(case.generator, EPS)
    r0, r1 = case.residual(), case.residual(d)
    if r0.shape[0] != case.s.shape[0]:
        return [f"residual has {r0.shape[0]} rows for a batch of {case.s.shape[0]} (one per sample)"], ""
    scale = max(rms(r1 - r0) / EPS, 1e-30)  # the residual's change per unit of perturbation
    loss0, g0 = case.loss_and_grad()
    loss1, g1 = case.loss_and_grad(d)
    finite = all(math.isfinite(v) for v in (loss0, loss1, rms(r0), rms(r1)))
    finite = finite and all(g is None or bool(torch.isfinite(g).all()) for g in (g0, g1))
    if not finite:
        return [f"loss, residual or gradient not finite (loss {loss0} at the exact map, {loss1} off it)"], ""
    g_scale = _norm(g1 - g0) if g0 is not None and g1 is not None else _norm(g1)
    rel_r, rel_g = rms(r0) / scale, _norm(g0) * EPS / max(g_scale, 1e-300)
    residual_ok = case.target == "conditional" or rel_r <= tol
    if case.target != "conditional" and rel_r > tol:
        hint = ("; the teacher's map is rk4 with fixed steps, whose error counts here (teacher_solver = "
                "\"dopri5\" meets teacher_tol)"
                if case.target == "teacher" and getattr(o, "teacher_solver", "") == "rk4"
                else "")
        msgs.append(f"off-diagonal residual is not zero at the exact flow map: RMS {rms(r0):.3g}, "
                    f"{rel_r:.3g} of its scale > {tol:g}, {_where(case, r0)}{hint}")
    if _norm(g1) == 0.0:
        msgs.append("gradient vanishes at a perturbed map: dL/dtheta = 0 (no gradient reaches the flow map?)")
    elif rel_g > tol and not (residual_ok and case.target != "conditional"):
        # with r = 0 per sample and penalty(0) = 0 the exact map minimizes the loss whatever the
        # gradient there (a penalty like |r| is not differentiable at 0): judged on the residual
        kind = "expected gradient (antithetic pairs)" if case.target == "conditional" else "gradient"
        msgs.append(f"{kind} is not zero at the exact flow map: |dL/dtheta| = {_norm(g0):.3g}, {rel_g:.3g} "
                    f"of its scale > {tol:g}: the exact flow map is not a minimizer")
    if case.target != "conditional" and not loss1 > loss0:  # conditional: noise dominates the value
        msgs.append(f"off-diagonal loss is not larger at a perturbed map ({loss1:.3g}) than at the exact "
                    f"one ({loss0:.3g})")
    summary = f"residual {rel_r:.1e}, gradient {rel_g:.1e} of scale at the exact map"
    if case.dtype == F64 and not msgs:
        probe = case
        if case.target == "conditional":  # the antithetic average is exact only for gradients odd in
            # the noise; a noise-dependent weight (MeanFlow's adaptive one) leaves Monte-Carlo error
            probe = _Case(case.obj, case.target, case.oracle, F64, max(case.n, CONDITIONAL_BATCH), case.seed,
                          case.frozen_network)
            d = probe.fm.direction(probe.generator, EPS)
        cosines = [_cosine(probe, d)] + [_cosine(probe, probe.fm.direction(probe.generator, EPS))
                                         for _ in range(DIRECTIONS - 1)]
        bad = [c for c in cosines if not c > 0]
        if bad:
            msgs.append(f"training does not pull the map back to the exact map: at theta* + eps d the gradient g "
                        f"has cos(g, d) = {min(cosines):+.3f} <= 0 for {len(bad)} of {len(cosines)} random "
                        "directions d (the exact map repels; a stop-gradient on the wrong side of the residual?)")
        summary += f", descent cos(g, d) >= {min(cosines):+.2f}"
    return msgs, summary


def _cosine(case: _Case, d: torch.Tensor) -> float:
    _, g = case.loss_and_grad(d)
    return float((g * d).sum() / (g.norm() * d.norm())) if g is not None and g.norm() > 0 else 0.0


def _converges(case: _Case) -> tuple[str | None, str]:
    """100 Adam steps (lr eps / 3, cosine decay) from theta* + d; (failure or None, summary)."""
    d = case.fm.direction(case.generator, EPS)
    theta = d.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=EPS / 3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, GD_STEPS)
    start = case.map_error(d)
    for _ in range(GD_STEPS):
        _, g = case.loss_and_grad(theta.detach())
        if g is None:
            return "gradient descent cannot run: no gradient reaches the flow map", ""
        opt.zero_grad()
        theta.grad = g
        opt.step()
        decay.step()
    ratio = case.map_error(theta.detach()) / start
    summary = f"{GD_STEPS} Adam steps from a perturbed map: map error x {ratio:.2g}"
    if not ratio < GD_FACTOR:
        how = "grows" if ratio > 1 else f"falls only to {ratio:.2g} of its start"
        return (f"gradient descent does not approach the exact map: after {GD_STEPS} Adam steps from a perturbed "
                f"map the map error {how} (must fall below {GD_FACTOR:g})"), summary
    return None, summary


def _diagonal(case: _Case) -> list[str]:
    """Flow matching at s = t with antithetic pairs: expected gradient zero at b_t, not off it."""
    tol = zero_tolerance(case.dtype)
    fm = PerturbedFlowMap(case.oracle)
    t = case.t[: len(case.t) // (2 if case.target == "conditional" else 1)].to(F64)
    x0, x1 = case.oracle.sample_base(len(t), case.generator), case.oracle.sample_data(len(t), case.generator)
    a, b = antithetic(case.oracle, t, x0, x1)
    tt = torch.cat([t, t]).to(case.dtype)
    norms = []
    for w in (0.0, EPS):
        with torch.no_grad():
            fm.weights.zero_()
            fm.weights[list(PerturbedFlowMap.DIAGONAL)] = w
        out = case.obj.loss_at(fm, case.oracle.interpolant, case.teacher,
                               Batch(a.to(case.dtype), b.to(case.dtype)), tt, tt, len(tt))
        g = torch.autograd.grad(out.loss, [fm.weights], allow_unused=True)[0] if out.loss.requires_grad else None
        norms.append(_norm(g))
    if norms[1] == 0.0:
        return ["diagonal gradient vanishes at a perturbed velocity"]
    if norms[0] * EPS / norms[1] > tol:
        return [f"diagonal (flow-matching) expected gradient is not zero at the exact velocity: |dL/dw| = "
                f"{norms[0]:.3g}, {norms[0] * EPS / norms[1]:.3g} of its scale > {tol:g}"]
    return []


def check_penalty(objective: Objective, dim: int = 3) -> str:
    """The per-sample loss ``objective.penalty(r)``, (B, ...) -> (B,), must vanish at r = 0 and be
    positive at every r != 0, so that it depends on the whole residual: probed at r = a e_i for every
    coordinate i and a in {1e-3, 1, 10}, at r = e_i - e_j (sums that cancel) and at random r, float64.

    Returns:
        a one-line summary. Raises CheckFailed naming each residual where the penalty is wrong.
    """
    eye = torch.eye(dim, dtype=F64)
    probes = [a * eye[i] for a in (1e-3, 1.0, 10.0) for i in range(dim)]
    probes += [eye[i] - eye[j] for i in range(dim) for j in range(i + 1, dim)]
    probes += list(torch.randn(4, dim, generator=torch.Generator().manual_seed(0), dtype=F64))
    r = torch.stack([torch.zeros(dim, dtype=F64)] + probes)
    per = objective.penalty(r).detach()
    name = type(objective).__name__
    if per.shape != (r.shape[0],):
        raise CheckFailed(f"{name}: penalty maps residuals ({r.shape[0]}, {dim}) to shape {tuple(per.shape)}, "
                          f"not ({r.shape[0]},): one loss per sample")
    msgs = []
    if per[0] != 0:
        msgs.append(f"penalty(0) = {per[0].item():.3g}, not 0: the exact flow map would not be a minimizer")
    zero = [probes[k] for k in range(len(probes)) if not per[k + 1] > 0]
    if zero:
        shown = ", ".join(str([round(v, 3) for v in z.tolist()]) for z in zero[:3])
        msgs.append(f"penalty vanishes at {len(zero)} non-zero residuals, e.g. r = {shown}: the per-sample loss "
                    "must depend on the whole residual and vanish only at r = 0 (a penalty on part of r, or "
                    "on the sum of its coordinates?)")
    if msgs:
        raise CheckFailed("\n".join(f"{name}: {m}" for m in msgs))
    return f"{name}: penalty zero at r = 0 only ({len(probes)} probes)"


def check_objective(objective: Objective | type[Objective], *, oracles: Sequence | None = None,
                    targets: Iterable[str] | None = None, dtypes: Iterable[torch.dtype] = (F32, F64),
                    n: int = 256, seed: int = 0) -> list[str]:
    """Check that ``objective`` trains toward the exact flow map (the module docstring lists the
    properties), for each target it declares, each oracle and each dtype.

    Args:
        objective: an Objective subclass (built with default options per target) or an instance
            (its options are kept, only ``target`` changes).
        oracles: exact oracles with ``velocity``, ``v``, ``conditional_mean``, ``sample_base``,
            ``sample_data`` on vectors (default :func:`~flowspec.testing.default_oracles`).
        targets: the targets to check (default: every target the objective declares).
        dtypes: float32 and float64 by default (descent and convergence run in float64).
        n: samples per batch (>= 8; the first 8 are the edge pairs of :func:`edge_times`).
        seed: seeds the data, the times, the directions and the objective's generator.
    Returns:
        one line per (target, oracle, dtype) case, with its measured numbers, then the penalty line
        and one convergence line per target (when the objective has off-diagonal samples).
    Raises:
        CheckFailed: listing every failing property, each line naming its case.
    """
    if n < len(edge_times()[0]):
        raise ValueError(f"check_objective needs n >= {len(edge_times()[0])} (the edge pairs), got {n}")
    cls = objective if isinstance(objective, type) else type(objective)
    targets = tuple(targets) if targets is not None else tuple(cls.targets)
    unsupported = [t for t in targets if t not in cls.targets]
    if unsupported:
        raise ValueError(f"{cls.__name__} does not declare targets {unsupported} (it declares {cls.targets})")
    oracles = list(oracles) if oracles is not None else default_oracles()
    failures, checked = [], []
    for target in targets:
        obj = _objective_for(objective, target)
        off = obj.options.diagonal_fraction < 1
        for k, oracle in enumerate(oracles):
            for dtype in dtypes:
                name = (f"{cls.__name__}(target={target!r}) {describe_oracle(oracle)} "
                        f"{str(dtype).replace('torch.', '')}")
                # "teacher": the analytic velocity for even k, a frozen network teacher for odd k
                case = _Case(obj, target, oracle, dtype, n, seed + k, frozen_network=k % 2 == 1)
                msgs, summary = _off_diagonal(case) if off else ([], "diagonal only")
                msgs += _diagonal(case)
                failures += [f"{name}: {m}" for m in msgs]
                checked.append(f"{name}: {summary}")
        if off and not any(f.startswith(f"{cls.__name__}(target={target!r})") for f in failures):
            case = _Case(obj, target, oracles[0], F64,
                         max(n, CONDITIONAL_BATCH if target == "conditional" else GD_BATCH), seed)
            msg, summary = _converges(case)
            name = f"{cls.__name__}(target={target!r}) {describe_oracle(oracles[0])} float64"
            failures += [f"{name}: {msg}"] if msg else []
            checked.append(f"{name}: {summary}")
    if any(_objective_for(objective, t).options.diagonal_fraction < 1 for t in targets):
        try:
            checked.append(check_penalty(_objective_for(objective, targets[0])))
        except CheckFailed as exc:
            failures += str(exc).splitlines()
    if failures:
        raise CheckFailed("\n".join(failures))
    return checked


__all__ = ["check_objective", "check_penalty"]
