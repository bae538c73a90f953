"""Sample-quality metrics: a model's samples against a dataset (docs/math.md, "What the paper reports").

A metric is called as ``metric(samples, dataset, generator) -> float`` with samples of shape
(N, *dataset.shape), float32, on the CPU; any fresh data it needs comes from ``generator``. A metric
that does not apply to a dataset raises :class:`MetricUnavailable` with a one-line reason.

A metric of per-sample features (the Fréchet distances) also offers ``features(samples)`` and
``from_features(features, dataset, generator)``: a data-parallel evaluation then extracts each
rank's share of the features on that rank and gathers only them (flowspec.evaluate).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from flowspec.data.base import Dataset


class MetricUnavailable(ValueError):
    """The metric cannot be computed for this dataset (the message says why, in one line)."""


class MetricOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metric:
    """Base class. Constructed as ``Metric(options=None)``; subclasses implement :meth:`__call__`. A
    subclass with its own ``Options`` declares ``options: ThoseOptions`` too, for the type checker."""

    Options: ClassVar[type[MetricOptions]] = MetricOptions
    lower_is_better: ClassVar[bool] = True

    def __init__(self, options: MetricOptions | None = None):
        self.options = options if options is not None else self.Options()

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        """The metric of samples (N, *dataset.shape) against the dataset's distribution."""
        raise NotImplementedError


class FeatureMetric(Metric):
    """A metric of per-sample features: ``metric(x) = from_features(features(x))``, where
    ``features`` treats each sample alone (so it may run on parts of the samples, anywhere)."""

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """(N, *dataset.shape) -> (N, F) float64 features, one row per sample."""
        raise NotImplementedError

    def from_features(self, features: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        """The metric of the samples whose features (N, F) these are."""
        raise NotImplementedError

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        self.check(dataset)
        return self.from_features(self.features(samples), dataset, generator)

    def check(self, dataset: Dataset) -> None:
        """Raise :class:`MetricUnavailable` when the metric does not apply to ``dataset``."""


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
    options: HistogramKLOptions
    floor = 1e-10

    def _cells(self, dataset: Dataset) -> tuple[list[torch.Tensor], torch.Tensor]:
        unavailable = MetricUnavailable(
            f"kl needs a 2-D dataset with a known density; {type(dataset).__name__} has none"
        )
        bounds = dataset.bounds()
        if tuple(dataset.shape) != (2,) or bounds is None:
            raise unavailable
        edges = [torch.linspace(lo, hi, self.options.bins + 1, dtype=torch.float64) for lo, hi in bounds]
        p = dataset.cell_mass(edges)
        if p is None:
            raise unavailable
        return edges, p

    def check(self, dataset: Dataset) -> None:
        """Raise :class:`MetricUnavailable` unless the dataset is 2-D with a closed-form density."""
        self._cells(dataset)

    def __call__(self, samples: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        edges, p = self._cells(dataset)
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
    options: EnergyDistanceOptions

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


# -- Fréchet distances on features (flowspec.features) -------------------------------------------------

def _reference_images(dataset: Dataset, max_samples: int, generator: torch.Generator) -> torch.Tensor:
    """The dataset's images for reference statistics: all of them (first max_samples) when the
    dataset holds them in memory, else max_samples fresh samples."""
    if hasattr(dataset, "all"):
        return dataset.all()[:max_samples]
    return dataset.sample(max_samples, generator)


class DigitsFrechet(FeatureMetric):
    """Fréchet distance between the digits classifier's 64-d features of the samples and of all 1797
    scikit-learn digits (flowspec.features): |mu_g - mu_d|^2 + tr(S_g + S_d - 2 (S_d^1/2 S_g S_d^1/2)^1/2).

    Samples are clipped to [-1, 1] first (as images are before display). Needs data of shape
    (1, 8, 8) in [-1, 1] (the ``digits`` dataset), else :class:`MetricUnavailable`. Zero for the data
    itself; grows as the samples' feature distribution departs from the digits'.
    """

    def check(self, dataset: Dataset) -> None:
        """Raise :class:`MetricUnavailable` unless the data are 8 x 8 digit images."""
        if tuple(dataset.shape) != (1, 8, 8):
            raise MetricUnavailable(f"digits_fd needs 8 x 8 digit images of shape (1, 8, 8); "
                                    f"{type(dataset).__name__} has shape {tuple(dataset.shape)}")

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """The classifier's 64-d features of the samples clipped to [-1, 1]."""
        from flowspec.features import digits_classifier

        model, _ = digits_classifier()
        with torch.no_grad():
            return model.features(samples.float().clamp(-1, 1))

    def from_features(self, features: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        from flowspec.features import digits_classifier, frechet_distance, statistics

        model, _ = digits_classifier()
        with torch.no_grad():
            ref = statistics(model.features(_reference_images(dataset, 100_000, generator)))
        return frechet_distance(*statistics(features), *ref)


class FIDOptions(MetricOptions):
    weights: str = Field("", description="path of pytorch-fid's Inception weights pt_inception-2015-12-05-6726825d.pth "
                         "converted to .safetensors (docs/images-and-gpus.md gives the one-line conversion)")
    batch_size: int = Field(100, gt=0, description="images per Inception forward pass")
    reference_samples: int = Field(50_000, ge=2, description="dataset images for the reference statistics")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the Inception network runs")


class FID(FeatureMetric):
    """Fréchet Inception distance: the Fréchet distance between Gaussians fitted to the 2048-d pool3
    features of Inception-v3 (flowspec.inception, the standard TF-FID weights) of the samples and of
    the dataset. Images in [-1, 1] are clipped, quantized to 8 bits as a saved PNG would be, resized
    to 299 x 299 (bilinear) and gray images repeated to 3 channels. The reference statistics are
    cached per dataset and weights file. Features are computed in batches with a progress bar."""

    Options = FIDOptions
    options: FIDOptions
    _cache: ClassVar[dict] = {}

    def _network(self):
        from flowspec.inception import load_inception

        o = self.options
        if not o.weights:
            raise MetricUnavailable(
                "fid needs the Inception weights: download pt_inception-2015-12-05-6726825d.pth (pytorch-fid's "
                "release), convert it to .safetensors (docs/images-and-gpus.md) and set "
                "eval.metric_options.fid.weights = \"PATH\"")
        from flowspec.distributed import resolve_device

        device = resolve_device(o.device)
        key = ("net", o.weights, str(device))
        if key not in self._cache:
            try:
                self._cache[key] = load_inception(o.weights).to(device)
            except FileNotFoundError:
                raise MetricUnavailable(f"fid: eval.metric_options.fid.weights: {o.weights}: no such file "
                                        "(download pt_inception-2015-12-05-6726825d.pth from pytorch-fid's "
                                        "releases and convert it to .safetensors)") from None
            except ValueError as exc:
                raise MetricUnavailable(f"fid: eval.metric_options.fid.weights: {exc}") from None
        return self._cache[key], device

    def _features(self, net, device, images: torch.Tensor, what: str) -> torch.Tensor:
        from flowspec.features import batched_features

        def extract(x: torch.Tensor) -> torch.Tensor:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the 8-bit image
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            with torch.no_grad():
                return net(x.to(device)).double().cpu()

        return batched_features(extract, images, self.options.batch_size, f"FID features ({what})")

    def check(self, dataset: Dataset) -> None:
        """Raise :class:`MetricUnavailable` unless the dataset is images and the weights load."""
        if len(dataset.shape) != 3 or dataset.shape[0] not in (1, 3):
            raise MetricUnavailable(f"fid needs images with 1 or 3 channels; {type(dataset).__name__} "
                                    f"has shape {tuple(dataset.shape)}")
        self._network()

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """The 2048-d pool3 features (float64) of the samples, as 8-bit images."""
        net, device = self._network()
        return self._features(net, device, samples, "samples")

    def from_features(self, features: torch.Tensor, dataset: Dataset, generator: torch.Generator) -> float:
        from flowspec.features import frechet_distance, statistics

        net, device = self._network()
        key = ("ref", self.options.weights, id(dataset), self.options.reference_samples)
        if key not in self._cache:
            ref = _reference_images(dataset, self.options.reference_samples, generator)
            self._cache[key] = statistics(self._features(net, device, ref, "data"))
        if features.shape[0] < 2:
            raise ValueError("fid needs at least 2 samples")
        return frechet_distance(*statistics(features), *self._cache[key])
