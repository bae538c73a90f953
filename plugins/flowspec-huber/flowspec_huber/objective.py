"""Lagrangian distillation with a pseudo-Huber penalty on the residual (an example flowspec plugin).

Residual of flowspec's Lagrangian objective (docs/math.md, "Losses"), pseudo-Huber penalty (c = huber_c):
    (X, dX/dt) = jvp(t -> X_{s,t}(I_s), primal t, tangent 1)
    r = dX/dt - sg(b-hat_t(sg(X)))
    loss per off-diagonal sample = sqrt(|r|^2 + c^2) - c

The penalty is ~|r|^2 / (2c) for |r| << c and ~|r| for |r| >> c, so large residuals (early in
training, or near t = 1 on sharp data) pull less than under |r|^2. It is zero exactly where r = 0
and positive elsewhere, so the exact flow map is still the minimizer; flowspec.testing's
check_objective checks that for both targets. Cost per off-diagonal sample: 1 + C, like LSD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import Field

from flowspec.objectives.base import ObjectiveOptions, squared_norm
from flowspec.objectives.lagrangian import Lagrangian


class HuberLagrangianOptions(ObjectiveOptions):
    huber_c: float = Field(0.03, gt=0, description="c of the pseudo-Huber penalty sqrt(|r|^2 + c^2) - c")


class HuberLagrangian(Lagrangian):
    """Lagrangian self-distillation (or with a teacher) with a pseudo-Huber penalty on the residual."""

    Options = HuberLagrangianOptions
    characterization = "lagrangian_huber"
    #: its own names: inherited ones would call it plain LSD / LMD
    names: ClassVar[Mapping[str, str]] = {"self": "LSD, pseudo-Huber penalty", "teacher": "LMD, pseudo-Huber penalty"}
    formula = ("x = I_s; (X, dX/dt) = jvp(t -> X_{s,t}(x), tangent 1); r = dX/dt - sg(b-hat_t(sg(X)))\n"
               "per-sample loss sqrt(|r|^2 + c^2) - c, c = huber_c; gradient only through dX/dt")
    targets = ("self", "teacher")
    cost = (1, 1)

    def penalty(self, r: torch.Tensor) -> torch.Tensor:
        """sqrt(|r|^2 + c^2) - c per sample, (B, ...) -> (B,); written as |r|^2 / (sqrt(|r|^2 + c^2) + c)
        so that it has no cancellation when |r| << c (exactly 0 at r = 0, in float32 too)."""
        c = self.options.huber_c
        sq = squared_norm(r)
        return sq / (torch.sqrt(sq + c * c) + c)
