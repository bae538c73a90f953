"""The teachers check_objective hands an objective with target = "teacher": each knows only b_t."""

from __future__ import annotations

import torch


class Memo:
    """b_t(x) remembered by the bytes of (t, x): the frozen teacher is called at the same points on
    every step of the convergence check (its ODE solves repeat exactly), so each is computed once."""

    def __init__(self, velocity):
        self.velocity, self.seen = velocity, {}

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (t.detach().cpu().numpy().tobytes(), x.detach().cpu().numpy().tobytes(), x.dtype)
        if key not in self.seen:
            self.seen[key] = self.velocity(t, x)
        return self.seen[key]


def kit_teacher(target: str, flow_map, oracle, frozen_network: bool = False):
    """The model itself, or for target = "teacher" a real teacher that knows only b_t: the oracle's
    analytic velocity (VelocityTeacher), or with ``frozen_network`` a frozen network whose diagonal
    is b_t (FlowMapTeacher over a copy of the exact map). Either way its map is its own ODE,
    integrated: the oracle's exact map is never handed to the objective."""
    from flowspec.teachers import FlowMapTeacher, SelfTeacher, VelocityTeacher
    from flowspec.testing.oracles import ExactFlowMap

    if target != "teacher":
        return SelfTeacher(flow_map)
    if frozen_network:
        return FlowMapTeacher(ExactFlowMap(oracle))
    return VelocityTeacher(Memo(oracle.velocity))


__all__ = ["Memo", "kit_teacher"]
