"""Shortcut models (Frans et al., arXiv 2410.12557) as progressive distillation on a dyadic grid.

MATH.md, "Progressive": shortcut models are the semigroup characterization with the midpoint split
(gamma = 1/2) on a dyadic grid. Off-diagonal pairs are drawn as a step h = 2^-k, k ~ U{0, ..., levels - 1},
a start s ~ U{0, h, 2h, ..., 1 - h} on the grid of that step, and t = s + h; with u = (s + t) / 2 and
x = I_s,

    r = v_{s,t}(I_s) - sg(1/2 v_{s,u}(I_s) + 1/2 v_{u,t}(X_{s,u}(I_s)))

the two half steps from the model itself (target = self), optionally from its EMA weights
(``ema_target = true``, as in the shortcut-model paper), or from a teacher's map. The diagonal
(eta of the batch) is flow matching, the shortcut paper's d = 0 term. Three forward passes, no jvp.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flowspec.objectives.progressive import Progressive, ProgressiveOptions


class ShortcutOptions(ProgressiveOptions):
    gamma: Literal["half"] = Field("half", description="the midpoint split (shortcut models)")
    levels: int = Field(7, ge=1, le=30, description="dyadic steps h = 2^-k, k = 0, ..., levels - 1 "
                                                    "(7: from 1 down to 1/64)")


class Shortcut(Progressive):
    Options = ShortcutOptions
    characterization = "shortcut"
    targets = ("self", "teacher")
    cost = (3, 0)

    def sample_times(self, n, device, dtype, generator=None):
        """(s, t, n_diag): n_diag = round(eta n) diagonal pairs s = t ~ U[0, 1], then dyadic pairs
        (s, s + 2^-k) with s on the grid of 2^-k."""
        n_diag = int(round(self.options.diagonal_fraction * n))
        t_diag = torch.rand(n_diag, device=device, dtype=dtype, generator=generator)
        m = n - n_diag
        k = torch.randint(0, self.options.levels, (m,), device=device, generator=generator)
        h = torch.pow(2.0, -k.to(torch.float64))
        cells = torch.pow(2.0, k.to(torch.float64))  # number of steps of size h in [0, 1]
        j = torch.floor(torch.rand(m, device=device, dtype=torch.float64, generator=generator) * cells)
        s = (j * h).to(dtype)
        t = ((j + 1) * h).to(dtype)
        return torch.cat([t_diag, s]), torch.cat([t_diag, t]), n_diag
