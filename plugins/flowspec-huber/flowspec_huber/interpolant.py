"""A power schedule: alpha_t = 1 - t^p, beta_t = t^p (p >= 1; p = 1 is the linear interpolant)."""

from __future__ import annotations

import torch
from pydantic import Field

from flowspec.interpolants import Coefficients, Interpolant, InterpolantOptions


class PowerOptions(InterpolantOptions):
    exponent: float = Field(2.0, ge=1.0, description="p in beta_t = t^p, alpha_t = 1 - t^p")


class Power(Interpolant):
    """alpha_t = 1 - t^p, beta_t = t^p; alphadot_t = -p t^(p-1), betadot_t = p t^(p-1).

    p > 1 spends more of [0, 1] near the base (beta small), p = 1 is ``linear``. alpha + beta = 1,
    so I_t moves along the segment from x0 to x1 as in the linear schedule, at another speed.
    For 1 < p < 2 the derivatives are not Lipschitz at t = 0 (flowspec.testing.check_interpolant
    reports it); p = 1 or p >= 2 are smooth enough.
    """

    Options = PowerOptions

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        p = self.options.exponent
        beta = t ** p
        beta_dot = p * t ** (p - 1)
        return Coefficients(alpha=1 - beta, beta=beta, alpha_dot=-beta_dot, beta_dot=beta_dot)
