"""Lagrangian distillation (LSD with target = self, LMD with a teacher). MATH.md, "Losses".

Characterization: d/dt X_{s,t}(x) = b_t(X_{s,t}(x)). With x = I_s,

    (X, dX/dt) = jvp(t -> X_{s,t}(I_s), primal t, tangent 1)     (forward mode in t only)
    r = dX/dt - sg(b-hat_t(sg(X)))

The gradient flows only through dX/dt. Cost per off-diagonal sample: 1 + C forward passes.
"""

from __future__ import annotations

import torch

from flowspec.jvp import jvp
from flowspec.objectives.base import Objective


class Lagrangian(Objective):
    characterization = "lagrangian"
    formula = ("x = I_s; (X, dX/dt) = jvp(t -> X_{s,t}(x), tangent 1)   (forward mode in t)\n"
               "r = dX/dt - sg(b-hat_t(sg(X)))   b-hat: the model's diagonal v_{t,t} (self) or the teacher's b_t\n"
               "gradient only through dX/dt; per-sample loss |r|^2; diagonal samples |v_{t,t}(I_t) - dI_t/dt|^2")
    targets = ("self", "teacher")
    cost = (1, 1)

    def residual(self, flow_map, teacher, s, t, x, dx):
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),),
                       strategy=self.options.jvp)
        return dX_dt - self.target_velocity(teacher, t, X)
