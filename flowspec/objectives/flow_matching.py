"""Flow matching alone: L_b = E_t E |v_{t,t}(I_t) - dI_t/dt|^2 on every sample (docs/math.md, "Diagonal").

Trains only the diagonal v_{t,t} = b_t: the baseline a flow map is compared with (sampled by an ODE
solver), and the teacher for distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from flowspec.flowmap import FlowMap
from flowspec.objectives.base import Objective, ObjectiveOptions, OffDiagonal, Teacher


class FlowMatchingOptions(ObjectiveOptions):
    diagonal_fraction: Literal[1.0] = Field(1.0, description="flow matching is all diagonal")  # type: ignore[valid-type]


class FlowMatching(Objective):
    Options: ClassVar[type[ObjectiveOptions]] = FlowMatchingOptions
    characterization: ClassVar[str] = "flow_matching"
    names: ClassVar[Mapping[str, str]] = {"self": "flow matching"}
    formula: ClassVar[str] = "every sample diagonal: loss |v_{t,t}(I_t) - dI_t/dt|^2, t ~ U[0, 1]"
    targets: ClassVar[tuple[str, ...]] = ("self",)
    cost: ClassVar[tuple[int, int]] = (0, 0)

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        # never called: every sample is diagonal
        raise AssertionError("flow matching has no off-diagonal samples")
