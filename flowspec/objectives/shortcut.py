"""Shortcut models (Frans et al., arXiv 2410.12557) as progressive distillation on a dyadic grid.

docs/math.md, "Progressive": shortcut models are the semigroup characterization with the midpoint split
(gamma = 1/2) on a dyadic grid. Off-diagonal pairs are drawn as a step h = 2^-k, k ~ U{0, ..., levels - 1},
a start s ~ U{0, h, 2h, ..., 1 - h} on the grid of that step, and t = s + h; with u = (s + t) / 2 and
x = I_s,

    r = v_{s,t}(I_s) - sg(1/2 v_{s,u}(I_s) + 1/2 v_{u,t}(X_{s,u}(I_s)))

the two half steps from the model itself (target = self), optionally from its EMA weights
(``ema_target = true``, as in the shortcut-model paper), or, with target = "teacher", from the
teacher's own flow map (its ODE integrated over [s, u] and [u, t], as for progressive distillation;
no anchor: the teacher's map is the target at every level). The diagonal
(eta of the batch) is flow matching, the shortcut paper's d = 0 term.

``anchor = true`` (default): at the finest level, h = 2^-(levels - 1), the half steps are the
diagonal velocity, i.e. the target is two Euler steps of the flow-matching field, as the shortcut
paper does at its smallest step. This ties the chain of bootstrapped targets to flow matching, at
the price of a bias: at the exact map the finest residual is the two-step Euler error, O(h). With
``anchor = false`` the exact map is the minimizer, but the finest targets come from half steps
h / 2 that no term trains, and self-distillation ran away on the checkerboard (loss 1e18 within
1000 steps; with the anchor, KL 1.5 at every K after 1000 steps). Three forward passes, no jvp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import Field

from flowspec.flowmap import FlowMap
from flowspec.interpolants import expand_as
from flowspec.objectives.base import ObjectiveOptions, OffDiagonal, Teacher
from flowspec.objectives.progressive import Progressive, ProgressiveOptions


class ShortcutOptions(ProgressiveOptions):
    gamma: Literal["half"] = Field("half", description="the midpoint split (shortcut models)")
    levels: int = Field(7, ge=1, le=30, description="dyadic steps h = 2^-k, k = 0, ..., levels - 1 "
                                                    "(7: from 1 down to 1/64)")
    anchor: bool = Field(True, description="finest level's half steps from the diagonal velocity (two "
                         "Euler steps, the shortcut paper's choice; biased by their error); false: from "
                         "the map (unbiased, unanchored: diverged in practice)")


class Shortcut(Progressive):
    Options: ClassVar[type[ObjectiveOptions]] = ShortcutOptions
    options: ShortcutOptions
    characterization: ClassVar[str] = "shortcut"
    names: ClassVar[Mapping[str, str]] = {"self": "shortcut model"}
    midpoint_names: ClassVar[Mapping[str, str]] = {}  # gamma is always 1/2: no PSD-M
    formula: ClassVar[str] = (
        "h = 2^-k, k ~ U{0..levels-1}; s on the grid of h; t = s + h; u = (s + t) / 2; x = I_s\n"
        "r = v_{s,t}(x) - sg(1/2 v'_{s,u}(x) + 1/2 v'_{u,t}(X'_{s,u}(x)))\n"
        "v', X': the model (self; at the finest level with anchor, two Euler steps of v_{s,s}) or the\n"
        "teacher's map, its ODE integrated over [s, u] then [u, t] (teacher); per-sample loss |r|^2")
    targets: ClassVar[tuple[str, ...]] = ("self", "teacher")

    def off_diagonal_times(self, m: int, device: torch.device | str | None, dtype: torch.dtype | None,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dyadic pairs (s, s + 2^-k), k ~ U{0, ..., levels - 1}, s uniform on the grid of 2^-k."""
        k = torch.randint(0, self.options.levels, (m,), device=device, generator=generator)
        h = torch.pow(2.0, -k.to(torch.float64))
        cells = torch.pow(2.0, k.to(torch.float64))  # number of steps of size h in [0, 1]
        j = torch.floor(torch.rand(m, device=device, dtype=torch.float64, generator=generator) * cells)
        return (j * h).to(dtype), ((j + 1) * h).to(dtype)

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        u = (s + t) / 2
        with torch.no_grad():
            if self.options.target == "teacher":  # the teacher's own map: no anchor, no Euler step
                v_su, v_ut = self.teacher_stages(teacher, s, u, t, x)
            else:
                finest = (t - s) <= 2.0 ** -(self.options.levels - 1) * (1 + 1e-6)
                finest = finest & self.options.anchor
                v_su = teacher.v(s, torch.where(finest, s, u), x)
                x_u = x + expand_as(u - s, x) * v_su
                v_ut = teacher.v(u, torch.where(finest, u, t), x_u)
            target = (v_su + v_ut) / 2
        return flow_map.v(s, t, x) - target
