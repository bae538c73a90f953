"""Flow map matching, the direct two-sided objective (arXiv 2406.07507; docs/math.md, "Losses").

Over (s, t) in [0, 1]^2 (both orders: the map is learned forward and backward), with x = I_s and its
tangent dI_s/ds from the same interpolant sample (target = "conditional"):

    y = X_{s,t}(I_s)                                       (to t and ...)
    (z, dz/dr) = jvp(r -> X_{t,r}(y), primal r = s, tangent 1)   (... back to s, derivative in the end time)
    r = ( dz/dr - dI_s/ds ,  z - I_s )                    |r|^2 = both squared terms

The first term is the Lagrangian condition with the conditional velocity as target, the second makes
X_{t,s} the inverse of X_{s,t}. No stop-gradient: the gradient flows through both maps. The diagonal
(eta of the batch) is flow matching as for every objective; the off-diagonal pairs are two independent
uniforms (not sorted). Cost: 2 + C forward passes per off-diagonal sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from flowspec.flowmap import FlowMap
from flowspec.jvp import jvp
from flowspec.objectives.base import Objective, ObjectiveOptions, OffDiagonal, Teacher


class FlowMapMatchingOptions(ObjectiveOptions):
    target: Literal["conditional"] = Field(
        "conditional", description="flow map matching regresses on the conditional tangent dI_s/ds")


class FlowMapMatching(Objective):
    Options: ClassVar[type[ObjectiveOptions]] = FlowMapMatchingOptions
    characterization: ClassVar[str] = "fmm"
    names: ClassVar[Mapping[str, str]] = {"conditional": "flow map matching"}
    formula: ClassVar[str] = (
        "(s, t) uniform on [0, 1]^2; x = I_s; y = X_{s,t}(x); (z, dz/dr) = jvp(r -> X_{t,r}(y) at r = s)\n"
        "r = (dz/dr - dI_s/ds, z - x), no stop-gradient; per-sample loss |r|^2 (both terms)")
    targets: ClassVar[tuple[str, ...]] = ("conditional",)
    cost: ClassVar[tuple[int, int]] = (2, 1)

    def off_diagonal_times(self, m: int, device: torch.device | str | None, dtype: torch.dtype | None,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) uniform on [0, 1]^2: both orders, the map learned forward and backward."""
        pair = torch.rand(m, 2, device=device, dtype=dtype, generator=generator)
        return pair[:, 0], pair[:, 1]

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x, dx = sample.s, sample.t, sample.xs, sample.dxs
        y = flow_map(s, t, x)
        z, dz = jvp(lambda r: flow_map(t, r, y), (s,), (torch.ones_like(s),), strategy=self.options.jvp)
        return torch.stack([dz - dx.detach(), z - x.detach()], dim=1)
