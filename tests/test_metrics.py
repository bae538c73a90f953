"""Metrics against exact answers: the histogram KL and the energy distance."""

import math

import pytest
import torch
from pydantic import ValidationError

from flowspec.data.base import Dataset
from flowspec.data.toy2d import Checkerboard, Gaussian, Moons
from flowspec.metrics import EnergyDistance, HistogramKL, Metric, MetricUnavailable


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_metric_base():
    assert Metric.lower_is_better and HistogramKL.lower_is_better and EnergyDistance.lower_is_better
    assert HistogramKL().options.bins == 50 and EnergyDistance().options.max_samples == 4096
    assert issubclass(MetricUnavailable, ValueError)
    with pytest.raises(ValidationError, match=r"bins\n  Input should be greater than 0"):
        HistogramKL.Options(bins=0)
    with pytest.raises(ValidationError, match=r"bin\n  Extra inputs are not permitted"):  # a misspelt key
        HistogramKL.Options(bin=10)


def test_kl_exact_on_a_tiny_histogram():
    # bins = 2: the four quadrants of the board, each with P = 1/4. (4, 4) lies on the right edge
    # and counts in the last cell; (5, 0) is outside the box: lost mass. Q = (2/5, 1/5, 0, 1/5).
    x = torch.tensor([[-1.0, -1.0], [-3.0, -2.0], [-1.0, 3.0], [4.0, 4.0], [5.0, 0.0]])
    kl = HistogramKL(HistogramKL.Options(bins=2))(x, Checkerboard(), gen())
    p = 0.25
    expected = p * math.log(p / 0.4) + 2 * p * math.log(p / 0.2) + p * math.log(p / 1e-10)
    assert kl == pytest.approx(expected, rel=1e-12)


def test_kl_of_exact_samples_is_near_the_noise_floor():
    dataset, n = Checkerboard(), 500_000
    edges = [torch.linspace(-4.0, 4.0, 51, dtype=torch.float64)] * 2
    floor = ((dataset.cell_mass(edges) > 0).sum().item() - 1) / (2 * n)
    kl = HistogramKL()(dataset.sample(n, gen()), dataset, gen())
    assert 0.5 * floor < kl < 1.5 * floor


def test_kl_of_wrong_distributions_is_much_larger():
    dataset, n = Checkerboard(), 200_000
    exact = HistogramKL()(dataset.sample(n, gen()), dataset, gen())
    uniform = 8 * torch.rand(n, 2, generator=gen(1)) - 4
    gaussian = Gaussian(Gaussian.Options(std=float(dataset.std()[0]))).sample(n, gen(2))
    edges = [torch.linspace(-4.0, 4.0, 51, dtype=torch.float64)] * 2
    p = dataset.cell_mass(edges)
    p = p[p > 0]
    uniform_kl = float((p * (p * 2500).log()).sum())  # KL(P || exact uniform), < log 2 (edge cells)
    assert HistogramKL()(uniform, dataset, gen()) == pytest.approx(uniform_kl, abs=0.01)
    assert HistogramKL()(uniform, dataset, gen()) > 50 * exact
    assert HistogramKL()(gaussian, dataset, gen()) > 50 * exact


def test_kl_of_samples_outside_the_box_is_large_and_finite():
    dataset = Checkerboard()
    edges = [torch.linspace(-4.0, 4.0, 51, dtype=torch.float64)] * 2
    p = dataset.cell_mass(edges)
    p = p[p > 0]
    kl = HistogramKL()(torch.full((1000, 2), 10.0), dataset, gen())
    assert math.isfinite(kl) and kl > 10
    assert kl == pytest.approx(float((p * (p / 1e-10).log()).sum()), rel=1e-12)


def test_kl_unavailable():
    with pytest.raises(MetricUnavailable, match="kl needs a 2-D dataset with a known density; Moons has none"):
        HistogramKL()(torch.zeros(10, 2), Moons(), gen())
    with pytest.raises(MetricUnavailable):
        HistogramKL()(torch.zeros(10, 3), Gaussian(Gaussian.Options(dim=3)), gen())


class TinyImages(Dataset):
    """Per-sample shape (1, 2, 2): standard normal pixels."""

    shape = (1, 2, 2)

    def sample(self, n, generator=None):
        return torch.randn(n, *self.shape, generator=generator)


def direct_energy(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|, pair by pair, within-set means over i != j."""
    x, y, n = x.flatten(1).double(), y.flatten(1).double(), len(x)

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.sqrt(sum((float(ai) - float(bi)) ** 2 for ai, bi in zip(a, b)))

    cross = sum(dist(a, b) for a in x for b in y) / n**2
    within = sum(dist(u[i], u[j]) for u in (x, y) for i in range(n) for j in range(n) if i != j)
    return 2 * cross - within / (n * (n - 1))


@pytest.mark.parametrize("dataset", [Checkerboard(), TinyImages()], ids=["checkerboard", "images"])
def test_energy_matches_direct_transcription(dataset):
    x = 1.5 * dataset.sample(7, gen(3)) + 0.2
    y = dataset.sample(7, gen(5))
    for chunk in (1, 3, 1024):
        metric = EnergyDistance(EnergyDistance.Options(chunk_size=chunk))
        assert metric(x, dataset, gen(5)) == pytest.approx(direct_energy(x, y), rel=1e-12, abs=1e-12)


def test_energy_uses_only_the_first_max_samples():
    dataset = Checkerboard()
    x = dataset.sample(20, gen(1))
    metric = EnergyDistance(EnergyDistance.Options(max_samples=8))
    assert metric(torch.cat([x[:8], torch.full((12, 2), 1e6)]), dataset, gen()) == metric(x[:8], dataset, gen())


def test_energy_same_distribution_near_zero_different_clearly_positive():
    dataset = Checkerboard()
    same = EnergyDistance()(dataset.sample(4096, gen(1)), dataset, gen(2))
    shifted = EnergyDistance()(dataset.sample(4096, gen(1)) + torch.tensor([2.0, 0.0]), dataset, gen(2))
    gaussian = Gaussian(Gaussian.Options(std=float(dataset.std()[0]))).sample(4096, gen(1))
    assert abs(same) < 5e-3
    assert shifted > 0.3
    assert EnergyDistance()(gaussian, dataset, gen(2)) > 0.02  # same std, wrong shape: smaller but clear
