"""The Objective base class (docs/math.md, "Losses" and "Sampling of (s, t)").

Every objective is flow matching on the diagonal samples plus one distillation residual r on the
off-diagonal samples:

    loss = ( sum_{diagonal} |v_{t,t}(I_t) - dI_t/dt|^2 + sum_{off-diagonal} |r|^2 ) / B

A fraction ``diagonal_fraction`` (eta) of each batch lies on the diagonal s = t, t ~ U[0, 1]; the rest
is uniform on the upper triangle s < t (two uniforms, s = min, t = max): :func:`sample_times`. A
subclass implements :meth:`Objective.residual`, which receives the off-diagonal part of the batch as
one :class:`OffDiagonal` (times, x0, x1, I_s, dI_s/ds, the interpolant, the generator); that is the
whole of a new objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from flowspec.flowmap import FlowMap
from flowspec.interpolants import Interpolant
from flowspec.jvp import Strategy

Target = Literal["self", "teacher", "conditional"]


@runtime_checkable
class Teacher(Protocol):
    """A distillation target b-hat (flowspec.teachers): the model's own diagonal, a closed-form
    velocity, or a frozen run. Objectives call it under stop-gradient."""

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b-hat_t(x) for t of shape (B,) and x of shape (B, ...)."""

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map velocity v_{s,t}(x) of the teacher's flow map."""


class ObjectiveOptions(BaseModel):
    """Options shared by every objective; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid")
    target: Target = Field(
        "self",
        description="distillation target b-hat: self (the model's own diagonal), teacher, "
        "or conditional (the Monte-Carlo tangent dI_s/ds)",
    )
    diagonal_fraction: float = Field(
        0.75, ge=0.0, le=1.0, description="eta: fraction of each batch on the diagonal s = t"
    )
    ema_target: bool = Field(
        False, description="self target from the EMA weights instead of the current ones"
    )
    jvp: Strategy = Field("exact", description="forward-mode derivative: exact | finite_difference")
    adaptive_weight: float = Field(
        0.0, ge=0.0, description="MeanFlow's adaptive loss weighting, power p: each per-sample term "
        "|r|^2 becomes sg(1 / (|r|^2 + adaptive_eps)^p) |r|^2 (0: off; MeanFlow uses 1; diverges on the "
        "checkerboard MLP's LSD: docs/networks.md)")
    adaptive_eps: float = Field(1e-3, gt=0.0, description="c in the adaptive weight (MeanFlow: 1e-3)")
    learned_weight: bool = Field(
        False, description="learned log-variance weight: each term becomes exp(-w_{s,t}) |r|^2 + w_{s,t}, "
        "w a small network of (s, t) trained with the map (flowspec.weighting); the reference code uses it for "
        "the U-Net only, and it diverges on the checkerboard MLP's LSD (docs/networks.md)")


@dataclass
class Batch:
    """One training batch: base samples x0 and data samples x1, both (B, ...), and the generator
    an objective draws its times from (None: torch's global RNG)."""

    x0: torch.Tensor
    x1: torch.Tensor
    generator: torch.Generator | None = None


@dataclass(frozen=True, eq=False)
class OffDiagonal:
    """The off-diagonal samples of a batch, everything a residual may use (docs/math.md, "Losses").

    s, t: times, (B,) (s < t, or any order for an objective that samples both);
    x0, x1: the base and data samples, (B, ...); xs = I_s and dxs = dI_s/ds of ``interpolant``
    at (s, x0, x1), (B, ...); generator: the batch's generator, for a residual that draws random
    numbers (None: torch's global RNG). Build one with :meth:`at` so that xs and dxs are the
    interpolant's.
    """

    s: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    xs: torch.Tensor
    dxs: torch.Tensor
    interpolant: Interpolant
    generator: torch.Generator | None = None

    @classmethod
    def at(cls, interpolant: Interpolant, s: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
           x1: torch.Tensor, generator: torch.Generator | None = None) -> OffDiagonal:
        """The samples at times (s, t) of (x0, x1): xs, dxs = interpolant.interpolate(s, x0, x1)."""
        xs, dxs = interpolant.interpolate(s, x0, x1)
        return cls(s=s, t=t, x0=x0, x1=x1, xs=xs, dxs=dxs, interpolant=interpolant, generator=generator)


#: draws m off-diagonal pairs: (m, device, dtype, generator) -> (s, t), each (m,)
PairSampler = Callable[[int, torch.device | str | None, torch.dtype | None, torch.Generator | None],
                       tuple[torch.Tensor, torch.Tensor]]


def upper_triangle(m: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """m pairs uniform on the triangle s <= t: two uniforms each, s the smaller and t the larger."""
    pair = torch.rand(m, 2, device=device, dtype=dtype, generator=generator)
    return pair.min(dim=1).values, pair.max(dim=1).values


def sample_times(n: int, eta: float, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None, off_diagonal: PairSampler = upper_triangle
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(s, t, n_diag), s and t (n,): the first n_diag = round(eta n) pairs on the diagonal s = t ~ U[0, 1],
    then n - n_diag pairs from ``off_diagonal`` (default: uniform on the triangle s < t). The diagonal
    times are drawn first, then the off-diagonal ones, all from ``generator``."""
    n_diag = int(round(eta * n))
    t_diag = torch.rand(n_diag, device=device, dtype=dtype, generator=generator)
    s, t = off_diagonal(n - n_diag, device, dtype, generator)
    return torch.cat([t_diag, s]), torch.cat([t_diag, t]), n_diag


@dataclass
class LossOutput:
    """Scalar loss and detached per-term means for logging (tensors: no device sync per step)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def squared_norm(r: torch.Tensor) -> torch.Tensor:
    """|r|^2 per sample: (B, ...) -> (B,), summed over all non-batch dimensions."""
    return r.pow(2).flatten(1).sum(1)


def adaptive(per: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    """MeanFlow's adaptive weighting (arXiv 2505.13447): sg(1 / (per + eps)^power) * per, (B,) -> (B,).
    With power = 1 the loss behaves like sum |r|^2 / (|r|^2 + eps), a robust (Cauchy-like) loss."""
    if power == 0:
        return per
    return per / (per.detach() + eps).pow(power)


class Objective:
    """Base class of every loss. Constructed as ``Objective(options)``.

    A new objective subclasses this, sets the class attributes below, and implements
    :meth:`residual` (and optionally :meth:`penalty` and :meth:`off_diagonal_times`); its options are a subclass of
    :class:`ObjectiveOptions` assigned to ``Options`` (pydantic fields: validated and documented in
    the spec reference like the built-ins'). At training time the step draws the whole batch's
    times with :meth:`sample_times` and calls :meth:`loss_at` on each process's chunk of it
    (flowspec.engine.split; calling the objective does both on one batch); the base class adds flow
    matching on the diagonal and averages (docs/math.md, "Sampling of (s, t)").

    Class attributes a subclass sets:
        characterization: the name a spec uses (``[objective] characterization = ...``).
        targets: the distillation targets it supports ("self", "teacher", "conditional");
            ``flowspec.testing.check_objective`` checks each of them.
        formula: the residual r and the per-sample loss, as ``flowspec explain`` prints them.
        names: the method's name per target ("LSD" for lagrangian with target self), as the command
            line prints it; a target without one is "characterization (target)". A subclass
            inherits its parent's names: a new method sets its own.
        cost: (forwards, jvps) per off-diagonal sample (docs/math.md, "Cost model"): c_D = forwards +
            jvps C, C the cost of a jvp in forward passes. Counts every network pass, with or without grad.
    """

    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions
    characterization: ClassVar[str] = ""
    #: the whole loss in words and symbols, printed by ``flowspec explain`` (several lines allowed)
    formula: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ("self",)
    cost: ClassVar[tuple[int, int]] = (1, 0)
    names: ClassVar[Mapping[str, str]] = {}
    #: teacher evaluations (NFE on the batch) of the last residual, logged as teacher_nfe when
    #: non-zero; set by objectives that integrate a teacher's ODE
    teacher_nfe: int = 0

    def __init__(self, options: ObjectiveOptions | None = None):
        self.options = options if options is not None else self.Options()
        if self.options.target not in self.targets:
            raise ValueError(f"{self.characterization} does not support target "
                             f"{self.options.target!r} (valid: {', '.join(self.targets)})")

    # -- the hooks a subclass implements --------------------------------------------------------
    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        """The distillation residual r on the off-diagonal samples.

        Args:
            flow_map: the model.
            teacher: the distillation target (stop-gradient is the teacher's job).
            sample: the off-diagonal samples: times s, t (B,); x0, x1; xs = I_s and dxs = dI_s/ds
                (the "conditional" target), (B, ...); the interpolant; the batch's generator, for
                any random numbers the residual draws.
        Returns:
            r, one row per sample (usually shaped like xs); the loss adds :meth:`penalty` (r).
        """
        raise NotImplementedError

    def penalty(self, r: torch.Tensor) -> torch.Tensor:
        """The per-sample loss of a residual: |r|^2 by default, (B, ...) -> (B,).

        Override for a robust loss (e.g. pseudo-Huber sqrt(|r|^2 + c^2) - c); it must be zero
        exactly where r = 0 and positive elsewhere, so the exact flow map stays the minimizer.
        """
        return squared_norm(r)

    def off_diagonal_times(self, m: int, device: torch.device | str | None, dtype: torch.dtype | None,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t), each (m,), of the off-diagonal samples: uniform on the triangle s < t by default."""
        return upper_triangle(m, device, dtype, generator)

    # -- shared machinery -----------------------------------------------------------------------
    def method_name(self) -> str:
        """The method's name for the chosen target (:attr:`names`), e.g. "LSD"."""
        target = self.options.target
        return self.names.get(target, f"{self.characterization} ({target})")

    def step_cost(self, c: float = 1.5) -> float:
        """A training step's cost in flow-matching steps (docs/math.md, "Cost model"): (1 - eta) c_D + eta
        with c_D = forwards + jvps C per off-diagonal sample (a diagonal sample costs 1)."""
        forwards, jvps = self.cost
        eta = self.options.diagonal_fraction
        return (1 - eta) * (forwards + jvps * c) + eta

    def teacher_cost(self) -> str:
        """What a frozen teacher costs per off-diagonal sample, in words ("" when nothing beyond
        :attr:`cost`; the progressive objectives integrate the teacher's ODE)."""
        return ""

    def cost_formula(self) -> str:
        """c_D as docs/math.md, "Cost model" writes it: "3", "1 + C", "1 + 2C"."""
        forwards, jvps = self.cost
        terms = ([str(forwards)] if forwards or not jvps else []) + ([f"{jvps if jvps > 1 else ''}C"] if jvps else [])
        return " + ".join(terms)

    def target_velocity(self, teacher: Teacher, t: torch.Tensor, x: torch.Tensor,
                        dx: torch.Tensor | None = None) -> torch.Tensor:
        """b-hat_t(x) under stop-gradient: the teacher's velocity, or dx for target = conditional."""
        if self.options.target == "conditional":
            if dx is None:
                raise ValueError(f"{self.characterization}: conditional target needs dI/dt")
            return dx.detach()
        with torch.no_grad():
            return teacher.velocity(t, x.detach())

    def _weigh(self, flow_map: FlowMap, s: torch.Tensor, t: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
        """Per-sample terms after the optional adaptive (MeanFlow) and learned (log-variance) weights."""
        o = self.options
        per = adaptive(per, o.adaptive_weight, o.adaptive_eps)
        if o.learned_weight and flow_map.log_weight is not None:
            w = flow_map.log_weight(s, t)
            per = torch.exp(-w) * per + w
        return per

    def sample_times(self, n: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(s, t, n_diag) of :func:`sample_times` with eta = diagonal_fraction and this objective's
        :meth:`off_diagonal_times`."""
        return sample_times(n, self.options.diagonal_fraction, device, dtype, generator, self.off_diagonal_times)

    def __call__(self, flow_map: FlowMap, interpolant: Interpolant, teacher: Teacher,
                 batch: Batch) -> LossOutput:
        """The batch loss (docs/math.md, "Sampling of (s, t)"): (sum of diagonal terms + sum of off-diagonal
        terms) / B."""
        x0 = batch.x0
        s, t, n_diag = self.sample_times(x0.shape[0], x0.device, x0.dtype, batch.generator)
        return self.loss_at(flow_map, interpolant, teacher, batch, s, t, n_diag)

    def loss_at(self, flow_map: FlowMap, interpolant: Interpolant, teacher: Teacher, batch: Batch,
                s: torch.Tensor, t: torch.Tensor, n_diag: int) -> LossOutput:
        """The loss at given times (the first n_diag pairs diagonal); separated for exact tests."""
        x0, x1 = batch.x0, batch.x1
        n = x0.shape[0]
        logs: dict[str, torch.Tensor] = {}
        total = x0.new_zeros(())
        if n_diag > 0:
            td = t[:n_diag]
            it, dit = interpolant.interpolate(td, x0[:n_diag], x1[:n_diag])
            per = squared_norm(flow_map.velocity(td, it) - dit)
            total = total + self._weigh(flow_map, td, td, per).sum()
            logs["diagonal"] = per.detach().mean()
        if n_diag < n:
            off = OffDiagonal.at(interpolant, s[n_diag:], t[n_diag:], x0[n_diag:], x1[n_diag:], batch.generator)
            per = self.penalty(self.residual(flow_map, teacher, off))
            total = total + self._weigh(flow_map, off.s, off.t, per).sum()
            logs["distill"] = per.detach().mean()
            if self.teacher_nfe:  # objectives that integrate a teacher's ODE
                logs["teacher_nfe"] = torch.tensor(float(self.teacher_nfe))
        loss = total / n
        logs["loss"] = loss.detach()
        return LossOutput(loss=loss, logs=logs)
