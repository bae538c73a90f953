"""A moment-matching metric: how far the samples' mean and covariance are from the data's."""

from __future__ import annotations

import torch
from pydantic import Field

from flowspec.data.base import Dataset
from flowspec.metrics import Metric, MetricOptions


class MomentErrorOptions(MetricOptions):
    data_samples: int = Field(100_000, ge=2, description="fresh data samples for the reference moments")


class MomentError(Metric):
    """|m_X - m_Y| + |C_X - C_Y|_F: Euclidean distance of the means plus Frobenius distance of the
    covariances (unbiased, float64) of the flattened samples X and ``data_samples`` fresh data
    samples Y. Zero for matching first and second moments; any dataset."""

    Options = MomentErrorOptions

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        x = samples.flatten(1).double()
        if x.shape[0] < 2:
            raise ValueError(f"moments needs at least 2 samples, got {x.shape[0]}")
        y = dataset.sample(self.options.data_samples, generator).flatten(1).double()
        mean = (x.mean(0) - y.mean(0)).norm()
        cov = (torch.cov(x.T).reshape(x.shape[1], -1) - torch.cov(y.T).reshape(y.shape[1], -1)).norm()
        return float(mean + cov)
