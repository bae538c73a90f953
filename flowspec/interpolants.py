"""Stochastic interpolants I_t = alpha_t x0 + beta_t x1 (docs/math.md, "Stochastic interpolant").

t = 0 is the base (noise), t = 1 is the data: alpha_0 = 1, alpha_1 = 0, beta_0 = 0, beta_1 = 1.
A schedule supplies alpha, beta and their time derivatives for a (B,) tensor of times; everything
else (broadcasting, the interpolant sample and its time derivative) lives in the base class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


def expand_as(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) so that it broadcasts against x of shape (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Coefficients:
    """Schedule values at times t, each of shape (B,)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_dot: torch.Tensor
    beta_dot: torch.Tensor


class InterpolantOptions(BaseModel):
    """Options every interpolant has. ``base_scale`` is c in x0 ~ N(0, c^2 I): a number, or
    "data_std" for the per-dimension standard deviation of the data (the paper's adaptive base)."""

    model_config = ConfigDict(extra="forbid")
    base_scale: Annotated[float, Field(gt=0)] | Literal["data_std"] = Field(
        1.0, description='c in x0 ~ N(0, c^2 I): a positive number or "data_std"'
    )


class Interpolant:
    """Base class: subclasses implement :meth:`coefficients` (alpha, beta and derivatives).

    Constructed as ``Interpolant(options)``; options are a subclass of :class:`InterpolantOptions`.
    """

    Options = InterpolantOptions

    def __init__(self, options: InterpolantOptions | None = None):
        self.options = options if options is not None else self.Options()

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """alpha_t, beta_t, alphadot_t, betadot_t for times t of shape (B,)."""
        raise NotImplementedError

    def interpolate(
        self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """I_t = alpha_t x0 + beta_t x1 and dI_t/dt = alphadot_t x0 + betadot_t x1.

        Args:
            t: times, shape (B,).
            x0, x1: base and data samples, shape (B, ...).
        Returns:
            (I_t, dI_t/dt), both shaped like x0.
        """
        c = self.coefficients(t)
        a, b = expand_as(c.alpha, x0), expand_as(c.beta, x0)
        ad, bd = expand_as(c.alpha_dot, x0), expand_as(c.beta_dot, x0)
        return a * x0 + b * x1, ad * x0 + bd * x1


class Linear(Interpolant):
    """alpha_t = 1 - t, beta_t = t (every result in the paper uses it)."""

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        one = torch.ones_like(t)
        return Coefficients(alpha=1 - t, beta=t, alpha_dot=-one, beta_dot=one)


class Trig(Interpolant):
    """alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2)."""

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        h = math.pi / 2
        c, s = torch.cos(h * t), torch.sin(h * t)
        return Coefficients(alpha=c, beta=s, alpha_dot=-h * s, beta_dot=h * c)


class GaussianBase:
    """The base distribution x0 ~ N(0, c^2 I); c is a scalar or a per-dimension tensor of shape (D...)."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def sample(self, n: int, shape: tuple[int, ...], *, device=None, dtype=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of shape (n, *shape)."""
        z = torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)
        return z * self.scale.to(device=z.device, dtype=z.dtype)

    def fixed(self, n: int, shape: tuple[int, ...], seed: int, *, device=None, dtype=None) -> torch.Tensor:
        """n samples from a CPU generator seeded ``seed``, moved to ``device``: the same points on
        every device and in every run of this shape and scale (the evaluations' base samples)."""
        z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        return (z * self.scale.cpu()).to(device, dtype)
