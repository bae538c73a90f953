"""Sample-quality metrics: a model's samples against a dataset (MATH.md, "What the paper reports").

A metric is called as ``metric(samples, dataset, generator) -> float`` with samples of shape
(N, *dataset.shape), float32, on the CPU; any fresh data it needs comes from ``generator``. A metric
that does not apply to a dataset raises :class:`MetricUnavailable` with a one-line reason.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from flowspec.data.base import Dataset


class MetricUnavailable(ValueError):
    """The metric cannot be computed for this dataset (the message says why, in one line)."""


class MetricOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metric:
    """Base class. Constructed as ``Metric(options=None)``; subclasses implement :meth:`__call__`."""

    Options: ClassVar[type[MetricOptions]] = MetricOptions
    lower_is_better: ClassVar[bool] = True

    def __init__(self, options: MetricOptions | None = None):
        self.options = options if options is not None else self.Options()

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        """The metric of samples (N, *dataset.shape) against the dataset's distribution."""
        raise NotImplementedError


class HistogramKLOptions(MetricOptions):
    bins: int = Field(50, gt=0, description="histogram cells per axis over dataset.bounds()")


class HistogramKL(Metric):
    """KL(P || Q) between the exact cell masses P and the sample histogram Q (the paper's checkerboard KL).

    The grid has ``bins`` x ``bins`` equal cells over ``dataset.bounds()``; the last cell on each axis
    includes its right edge. P_i = ``dataset.cell_mass(edges)``, Q_i = n_i / N with n_i the samples in
    cell i and N the number of all samples, so samples outside the box are lost mass that the metric
    penalizes. In float64,

        KL = sum_{i: P_i > 0} P_i log(P_i / max(Q_i, 1e-10)),

    cells with P_i = 0 contribute 0, and empty cells with P_i > 0 count as Q_i = 1e-10 (large but finite).
    Needs a 2-D dataset with bounds and a closed-form cell_mass, else :class:`MetricUnavailable`.
    """

    Options = HistogramKLOptions
    floor = 1e-10

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        unavailable = MetricUnavailable(
            f"kl needs a 2-D dataset with a known density; {type(dataset).__name__} has none"
        )
        if dataset.shape != (2,) or dataset.bounds() is None:
            raise unavailable
        edges = [torch.linspace(lo, hi, self.options.bins + 1, dtype=torch.float64) for lo, hi in dataset.bounds()]
        p = dataset.cell_mass(edges)
        if p is None:
            raise unavailable
        x = samples.reshape(samples.shape[0], -1).double()
        q = torch.histogramdd(x, bins=edges).hist / x.shape[0]
        mask = p > 0
        return float((p[mask] * (p[mask] / q[mask].clamp_min(self.floor)).log()).sum())


class EnergyDistanceOptions(MetricOptions):
    max_samples: int = Field(4096, ge=2, description="use the first max_samples samples and as many data samples")
    chunk_size: int = Field(1024, gt=0, description="rows per block of pairwise distances (memory)")


class EnergyDistance(Metric):
    """Energy distance D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean norm of flattened samples).

    X: the first n = min(N, ``max_samples``) samples; Y: n fresh dataset samples drawn with the
    generator. Unbiased estimate in float64: the cross term averages all n^2 pairs, the within-set terms
    the n (n - 1) pairs i != j. Distances are computed ``chunk_size`` rows at a time. Zero in
    expectation when X ~ data; may come out slightly negative.
    """

    Options = EnergyDistanceOptions

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        x = samples[: self.options.max_samples].flatten(1).double()
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"energy distance needs at least 2 samples, got {n}")
        y = dataset.sample(n, generator).flatten(1).double()
        within = (self._distance_sum(x, x) + self._distance_sum(y, y)) / (n * (n - 1))
        return float(2 * self._distance_sum(x, y) / n**2 - within)

    def _distance_sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """sum_{i, j} |a_i - b_j|, with the diagonal i = j set to exactly 0 when a is b."""
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, a.shape[0], self.options.chunk_size):
            d = torch.cdist(a[start : start + self.options.chunk_size], b)
            if a is b:
                rows = torch.arange(d.shape[0])
                d[rows, start + rows] = 0.0
            total += d.sum()
        return total
