"""Flow matching alone: L_b = E_t E |v_{t,t}(I_t) - dI_t/dt|^2 on every sample (docs/math.md, "Diagonal").

Trains only the diagonal v_{t,t} = b_t: the baseline a flow map is compared with (sampled by an ODE
solver), and the teacher for distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from flowspec.flowmap import FlowMap
from flowspec.objectives.base import Objective, ObjectiveOptions, OffDiagonal, Teacher


class FlowMatchingOptions(ObjectiveOptions):
    diagonal_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="always 1.0: flow matching puts every sample on the diagonal; an eta "
        "meant for another characterization (a spec switched with --set objective.characterization="
        "flow_matching) is replaced by 1.0, as the resolved spec shows")

    @field_validator("diagonal_fraction")
    @classmethod
    def _every_sample_on_the_diagonal(cls, value: float) -> float:
        """Flow matching sets its own eta: 1.0, whatever a spec written for a distillation says."""
        return 1.0


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
