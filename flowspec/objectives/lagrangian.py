"""Lagrangian distillation (LSD with target = self, LMD with a teacher). docs/math.md, "Losses".

Characterization: d/dt X_{s,t}(x) = b_t(X_{s,t}(x)). With x = I_s,

    (X, dX/dt) = jvp(t -> X_{s,t}(I_s), primal t, tangent 1)     (forward mode in t only)
    r = dX/dt - sg(b-hat_t(sg(X)))

The gradient flows only through dX/dt. Cost per off-diagonal sample: 1 + C forward passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from flowspec.flowmap import FlowMap
from flowspec.jvp import jvp
from flowspec.objectives.base import Objective, OffDiagonal, Teacher


class Lagrangian(Objective):
    characterization: ClassVar[str] = "lagrangian"
    names: ClassVar[Mapping[str, str]] = {"self": "LSD", "teacher": "LMD"}
    formula: ClassVar[str] = (
        "x = I_s; (X, dX/dt) = jvp(t -> X_{s,t}(x), tangent 1)   (forward mode in t)\n"
        "r = dX/dt - sg(b-hat_t(sg(X)))   b-hat: the model's diagonal v_{t,t} (self) or the teacher's b_t\n"
        "gradient only through dX/dt; per-sample loss |r|^2; diagonal samples |v_{t,t}(I_t) - dI_t/dt|^2")
    targets: ClassVar[tuple[str, ...]] = ("self", "teacher")
    cost: ClassVar[tuple[int, int]] = (1, 1)

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),),
                       strategy=self.options.jvp)
        return dX_dt - self.target_velocity(teacher, t, X)
