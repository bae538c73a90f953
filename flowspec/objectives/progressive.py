"""Progressive (semigroup) distillation: PSD with target = self, PD with a teacher. MATH.md, "Losses".

Characterization: X_{u,t}(X_{s,u}(x)) = X_{s,t}(x) for s <= u <= t. Divided by (t - s), with
u = gamma s + (1 - gamma) t and x = I_s:

    r = v_{s,t}(I_s) - sg((1 - gamma) v_{s,u}(I_s) + gamma v_{u,t}(X_{s,u}(I_s)))

gamma ~ U[0, 1] (PSD-U, gamma = "uniform") or gamma = 1/2 (PSD-M, "half"). No jvp: three forward
passes. The two short steps come from the teacher's map (the model itself under self-distillation).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flowspec.interpolants import expand_as
from flowspec.objectives.base import Objective, ObjectiveOptions


class ProgressiveOptions(ObjectiveOptions):
    gamma: Literal["uniform", "half"] = Field(
        "uniform", description="split point u = gamma s + (1 - gamma) t: uniform (PSD-U) or half (PSD-M)"
    )


class Progressive(Objective):
    Options = ProgressiveOptions
    characterization = "progressive"
    targets = ("self", "teacher")
    cost = (3, 0)

    def split(self, s: torch.Tensor) -> torch.Tensor:
        """gamma, shape (B,)."""
        if self.options.gamma == "half":
            return torch.full_like(s, 0.5)
        return torch.rand(s.shape, device=s.device, dtype=s.dtype, generator=self.generator)

    def residual(self, flow_map, teacher, s, t, x, dx):
        gamma = self.split(s)
        u = gamma * s + (1 - gamma) * t
        with torch.no_grad():
            v_su = teacher.v(s, u, x)
            x_u = x + expand_as(u - s, x) * v_su
            g = expand_as(gamma, x)
            target = (1 - g) * v_su + g * teacher.v(u, t, x_u)
        return flow_map.v(s, t, x) - target
