"""Eulerian distillation (ESD with target = self, EMD with a teacher, MeanFlow with conditional).

Characterization: d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b_s(x) = 0. With x = I_s (docs/math.md, "Losses"),

    r = d/ds X_{s,t}(I_s) + sg(grad_x X_{s,t}(I_s) b-hat_s(I_s))

stop_gradient = "full" (the paper's default): the gradient flows only through d/ds X; the advective
term is a forward-mode jvp in x taken without a graph. stop_gradient = "none": one augmented jvp
over (s, x) with tangent (1, b-hat_s), the gradient through both terms (b-hat itself is always
stop-gradiented). Cost: 1 + C forward passes ("none"), plus one graph-free jvp ("full").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from flowspec.flowmap import FlowMap
from flowspec.jvp import jvp
from flowspec.objectives.base import Objective, ObjectiveOptions, OffDiagonal, Teacher


class EulerianOptions(ObjectiveOptions):
    stop_gradient: Literal["full", "none"] = Field(
        "full", description="full: gradient only through d/ds X; none: through the whole residual"
    )

    @model_validator(mode="after")
    def _unbiased(self) -> EulerianOptions:
        # With the Monte-Carlo tangent, |r|^2's noise variance depends on grad_x X when the
        # gradient flows through the advective term: the exact map is then not the minimizer.
        if self.target == "conditional" and self.stop_gradient == "none":
            raise ValueError("stop_gradient = 'none' with target = 'conditional' is biased "
                             "(its minimizer is not the flow map); use stop_gradient = 'full'")
        return self


class Eulerian(Objective):
    Options: ClassVar[type[ObjectiveOptions]] = EulerianOptions
    options: EulerianOptions
    characterization: ClassVar[str] = "eulerian"
    names: ClassVar[Mapping[str, str]] = {"self": "ESD", "teacher": "EMD",
                                          "conditional": "MeanFlow (Eulerian consistency training)"}
    formula: ClassVar[str] = (
        "x = I_s; b = b-hat_s(x): the model's diagonal v_{s,s} (self), the teacher's b_s, or dI_s/ds "
        "(conditional)\n"
        "r = d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b   (jvps: in s, and in x along b)\n"
        "stop_gradient = full: gradient only through d/ds X; none: through both terms (b always sg)\n"
        "per-sample loss |r|^2; diagonal samples |v_{t,t}(I_t) - dI_t/dt|^2")
    targets: ClassVar[tuple[str, ...]] = ("self", "teacher", "conditional")

    @property
    def cost(self) -> tuple[int, int]:  # type: ignore[override]
        """stop_gradient = none: one augmented jvp over (s, x) (1 + C, or C with the conditional target).
        full: the advective term is a second, gradient-free jvp in x (1 + 2C, or 2C)."""
        teacher = 0 if self.options.target == "conditional" else 1
        return (teacher, 1 if self.options.stop_gradient == "none" else 2)

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        b = self.target_velocity(teacher, s, x, sample.dxs)
        ones = torch.ones_like(s)
        strategy = self.options.jvp
        if self.options.stop_gradient == "none":
            _, total = jvp(lambda ss, xx: flow_map(ss, t, xx), (s, x), (ones, b), strategy=strategy)
            return total
        _, dX_ds = jvp(lambda ss: flow_map(ss, t, x), (s,), (ones,), strategy=strategy)
        with torch.no_grad():
            _, advection = jvp(lambda xx: flow_map(s, t, xx), (x,), (b,), strategy=strategy)
        return dX_ds + advection
