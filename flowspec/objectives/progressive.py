"""Progressive (semigroup) distillation: PSD with target = self, PD with a teacher. docs/math.md, "Losses".

Characterization: X_{u,t}(X_{s,u}(x)) = X_{s,t}(x) for s <= u <= t. Divided by (t - s), with
u = gamma s + (1 - gamma) t and x = I_s:

    r = v_{s,t}(I_s) - sg((1 - gamma) v_{s,u}(I_s) + gamma v_{u,t}(X_{s,u}(I_s)))

gamma ~ U[0, 1] (PSD-U, gamma = "uniform") or gamma = 1/2 (PSD-M, "half"). Self-distillation takes the
two short steps from the model itself: three forward passes, no jvp. With a teacher (PD) the two
short steps are the teacher's own flow map: its ODE xdot = b_t(x) integrated over [s, u], then from
X_{s,u}(I_s) over [u, t] (flowspec.ode.map_velocity, per sample in normalised time, float64 state),
so that the exact flow map of the teacher is the minimizer at every (s, t); one Euler step of b per
stage would make the minimizer a first-order two-stage step instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from flowspec.flowmap import FlowMap
from flowspec.interpolants import expand_as
from flowspec.objectives.base import Objective, ObjectiveOptions, OffDiagonal, Teacher
from flowspec.ode import TeacherMapOptions, map_velocity


class ProgressiveOptions(ObjectiveOptions):
    gamma: Literal["uniform", "half"] = Field(
        "uniform", description="split point u = gamma s + (1 - gamma) t: uniform (PSD-U) or half (PSD-M)"
    )
    teacher_solver: Literal["dopri5", "rk4"] = Field(
        "dopri5", description='target = "teacher": how each stage of the teacher\'s map is integrated: '
        "dopri5 (adaptive, every sample to teacher_tol) or rk4 (teacher_steps fixed steps)")
    teacher_tol: float = Field(1e-7, gt=0, description="dopri5 rtol = atol of the teacher's map, per sample")
    teacher_steps: int = Field(16, ge=1, description="rk4 steps per stage (4 teacher evaluations each)")


class Progressive(Objective):
    Options: ClassVar[type[ObjectiveOptions]] = ProgressiveOptions
    options: ProgressiveOptions
    characterization: ClassVar[str] = "progressive"
    #: PSD-U with gamma ~ U[0, 1]; with gamma = 1/2, :attr:`midpoint_names` where they differ
    names: ClassVar[Mapping[str, str]] = {"self": "PSD-U", "teacher": "PD"}
    midpoint_names: ClassVar[Mapping[str, str]] = {"self": "PSD-M"}
    targets: ClassVar[tuple[str, ...]] = ("self", "teacher")
    formula: ClassVar[str] = (
        "u = gamma s + (1 - gamma) t, gamma ~ U[0, 1] (uniform) or 1/2 (half); x = I_s\n"
        "r = v_{s,t}(x) - sg((1 - gamma) v'_{s,u}(x) + gamma v'_{u,t}(X'_{s,u}(x)))\n"
        "v', X': the model itself (target self), or the teacher's map, its ODE xdot = b_t(x) integrated\n"
        "over [s, u] and then over [u, t] (target teacher); per-sample loss |r|^2")

    @property
    def cost(self) -> tuple[int, int]:  # type: ignore[override]
        """(forwards, jvps) of the model per off-diagonal sample: 3 (self), 1 (teacher, plus the
        teacher's evaluations: :meth:`teacher_cost`)."""
        return (1, 0) if self.options.target == "teacher" else (3, 0)

    def method_name(self) -> str:
        """PSD-U / PSD-M (target self, by gamma) or PD (teacher)."""
        if self.options.gamma == "half" and self.options.target in self.midpoint_names:
            return self.midpoint_names[self.options.target]
        return super().method_name()

    def teacher_map_options(self) -> TeacherMapOptions:
        o = self.options
        return TeacherMapOptions(solver=o.teacher_solver, tol=o.teacher_tol, steps=o.teacher_steps)

    def teacher_cost(self) -> str:
        """The teacher's evaluations per off-diagonal sample, in words ("" with target = self)."""
        if self.options.target != "teacher":
            return ""
        o = self.options
        if o.teacher_solver == "rk4":
            return f"+ 2 x {4 * o.teacher_steps} teacher evaluations (2 stages of rk4, K = {o.teacher_steps})"
        return (f"+ 2 adaptive dopri5 solves of the teacher's ODE (tol {o.teacher_tol:g}; about 60-150 "
                "teacher evaluations each on Gaussian targets; logged as teacher_nfe)")

    def split(self, s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """gamma, shape (B,): 1/2, or uniform draws from ``generator`` (None: torch's global RNG)."""
        if self.options.gamma == "half":
            return torch.full_like(s, 0.5)
        return torch.rand(s.shape, device=s.device, dtype=s.dtype, generator=generator)

    def teacher_stages(self, teacher: Teacher, s: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v'_{s,u}(x), v'_{u,t}(X'_{s,u}(x))) of the teacher's integrated map, each shaped like x;
        sets :attr:`teacher_nfe` to the teacher evaluations of both stages."""
        opts = self.teacher_map_options()
        ev = getattr(teacher, "eval_dtype", None)  # float64 for closed-form teachers
        v_su, n1 = map_velocity(teacher.velocity, s, u, x, opts, ev)
        x_u = x + expand_as(u - s, x) * v_su
        v_ut, n2 = map_velocity(teacher.velocity, u, t, x_u, opts, ev)
        self.teacher_nfe = n1 + n2
        return v_su, v_ut

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        gamma = self.split(s, sample.generator)
        u = gamma * s + (1 - gamma) * t
        g = expand_as(gamma, x)
        with torch.no_grad():
            if self.options.target == "teacher":
                v_su, v_ut = self.teacher_stages(teacher, s, u, t, x)
            else:
                v_su = teacher.v(s, u, x)
                v_ut = teacher.v(u, t, x + expand_as(u - s, x) * v_su)
            target = (1 - g) * v_su + g * v_ut
        return flow_map.v(s, t, x) - target
