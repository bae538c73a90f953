"""Flow matching alone: L_b = E_t E |v_{t,t}(I_t) - dI_t/dt|^2 on every sample (MATH.md, "Diagonal").

Trains only the diagonal v_{t,t} = b_t: the baseline a flow map is compared with (sampled by an ODE
solver), and the teacher for distillation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowspec.objectives.base import Objective, ObjectiveOptions


class FlowMatchingOptions(ObjectiveOptions):
    diagonal_fraction: Literal[1.0] = Field(1.0, description="flow matching is all diagonal")


class FlowMatching(Objective):
    Options = FlowMatchingOptions
    characterization = "flow_matching"
    formula = "every sample diagonal: loss |v_{t,t}(I_t) - dI_t/dt|^2, t ~ U[0, 1]"
    targets = ("self",)
    cost = (0, 0)

    def residual(self, flow_map, teacher, s, t, x, dx):  # never called: every sample is diagonal
        raise AssertionError("flow matching has no off-diagonal samples")
