"""The Dataset base class: an infinite sampler of data x1 ~ p_1 with a few known facts about p_1."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class DatasetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dataset:
    """Base class. Constructed as ``Dataset(options)``.

    Subclasses set ``shape`` (per-sample shape) and implement :meth:`sample`; they may override
    :meth:`std` (else estimated from 100,000 samples), :meth:`bounds` and :meth:`cell_mass`. A
    subclass with its own ``Options`` declares ``options: ThoseOptions`` too, for the type checker.
    """

    Options: ClassVar[type[DatasetOptions]] = DatasetOptions
    shape: tuple[int, ...] = (2,)

    def __init__(self, options: DatasetOptions | None = None):
        self.options: DatasetOptions = options if options is not None else self.Options()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, float32, shape (n, *shape), on the CPU."""
        raise NotImplementedError

    def std(self) -> torch.Tensor:
        """Per-dimension standard deviation, shape ``shape`` (the "data_std" base scale)."""
        g = torch.Generator().manual_seed(0)
        return self.sample(100_000, g).double().std(dim=0).float()

    def bounds(self) -> tuple[tuple[float, float], ...] | None:
        """Bounding box ((lo, hi) per dimension) used for histograms and plots, or None."""
        return None

    def cell_mass(self, edges: list[torch.Tensor]) -> torch.Tensor | None:
        """Exact probability of each cell of a grid (edges per dimension, float64), or None
        when the density is not known in closed form. Shape (len(e) - 1 for e in edges)."""
        return None
