"""Toy datasets against exact answers: supports, cell masses, standard deviations, reproducibility."""

import math

import pytest
import torch
from pydantic import ValidationError

from flowspec.data.toy2d import Checkerboard, EightGaussians, Gaussian, GaussianMixture, Moons

N = 200_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DATASETS = {
    "checkerboard": Checkerboard,
    "checkerboard_scale_half": lambda: Checkerboard(Checkerboard.Options(scale=0.5)),
    "eight_gaussians": EightGaussians,
    "moons": Moons,
    "gaussian": lambda: Gaussian(Gaussian.Options(mean=[1.0, -2.0], std=0.7)),
    "gaussian_3d": lambda: Gaussian(Gaussian.Options(dim=3, mean=0.5, std=2.0)),
    "gmm": GaussianMixture,
    "gmm_weighted": lambda: GaussianMixture(
        GaussianMixture.Options(means=[[0.0, 0.0], [3.0, 1.0]], stds=[0.3, 1.2], weights=[3.0, 1.0])
    ),
}
WITH_DENSITY = [k for k in DATASETS if k not in ("moons", "gaussian_3d")]


@pytest.fixture(scope="module")
def samples():
    """N samples of each dataset, drawn once."""
    return {name: (make(), make().sample(N, gen())) for name, make in DATASETS.items()}


@pytest.mark.parametrize("name", DATASETS)
def test_sample_dtype_shape_and_std(samples, name):
    dataset, x = samples[name]
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape == (N, *dataset.shape)
    assert dataset.std().shape == dataset.shape
    torch.testing.assert_close(x.double().std(0).float(), dataset.std(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("name", DATASETS)
def test_sample_uses_only_the_generator(name):
    dataset = DATASETS[name]()
    torch.manual_seed(1)
    a = dataset.sample(500, gen(7))
    torch.manual_seed(2)
    b = dataset.sample(500, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, dataset.sample(500, gen(8)))


def test_checkerboard_support_and_cell_frequencies(samples):
    dataset, x = samples["checkerboard"]
    assert x.abs().max() <= 4
    cell = torch.floor((x + 4) / 2).long().clamp(0, 3)  # board indices (i, j) in {0..3}^2
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)[[0, 2, 5, 7, 8, 10, 13, 15]].double()
    expected = N / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25  # 7 degrees of freedom: P(chi2 > 25) ~ 1e-3
    assert dataset.bounds() == ((-4.0, 4.0), (-4.0, 4.0))
    torch.testing.assert_close(dataset.std(), torch.full((2,), 4 / math.sqrt(3)))


def test_checkerboard_cell_mass_exact_values():
    e = torch.tensor([-4.0, -3.0, -2.0, 0.0, 5.0], dtype=torch.float64)
    mass = Checkerboard().cell_mass([e, e])
    # Board squares have area 4, total area 32; [-4, -2]^2 is a black square, [-2, 0] x [-4, -2] is white.
    assert mass[0, 0] == pytest.approx(1 / 32)  # [-4, -3] x [-4, -3]: area 1 inside a black square
    assert mass[0, 2] == 0  # [-4, -3] x [-2, 0]: a white square
    assert mass[2, 2] == pytest.approx(4 / 32)  # [-2, 0]^2: a whole black square
    assert mass[3, 3] == pytest.approx(8 / 32)  # [0, 5]^2: two black squares, area beyond 4 is empty
    assert mass.sum() == pytest.approx(1.0, abs=1e-14)
    shifted = torch.linspace(-5.0, 5.0, 8, dtype=torch.float64)
    assert Checkerboard().cell_mass([shifted, e]).shape == (7, 4)
    assert Checkerboard().cell_mass([shifted, shifted]).sum() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_cell_mass_sums_to_one_and_matches_histogram(samples, name):
    dataset, x = samples[name]
    wide = torch.linspace(-60.0, 60.0, 5, dtype=torch.float64)
    assert dataset.cell_mass([wide, wide]).sum() == pytest.approx(1.0, abs=1e-12)
    edges = [torch.linspace(lo, hi, 11, dtype=torch.float64) for lo, hi in dataset.bounds()]
    p = dataset.cell_mass(edges)
    assert p.dtype == torch.float64 and p.shape == (10, 10) and (p >= 0).all()
    assert p.sum() == pytest.approx(1.0, abs=2e-4)  # bounds pad the components by 4 stds
    q = torch.histogramdd(x.double(), bins=edges).hist / N
    assert ((q - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-5).all()


def test_no_cell_mass_without_closed_form():
    e = torch.linspace(-3.0, 3.0, 4, dtype=torch.float64)
    assert Moons().cell_mass([e, e]) is None
    assert Gaussian(Gaussian.Options(dim=3)).cell_mass([e, e, e]) is None


def test_mixture_parameters():
    w, m, s = GaussianMixture(GaussianMixture.Options(means=[[0.0], [2.0]], stds=[1.0, 0.5], weights=[1, 3])).mixture()
    assert all(t.dtype == torch.float64 for t in (w, m, s))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert m.shape == (2, 1) and s.shape == (2,)
    w, m, s = EightGaussians().mixture()
    torch.testing.assert_close(w, torch.full((8,), 0.125, dtype=torch.float64))
    torch.testing.assert_close(m.norm(dim=1), torch.full((8,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(m[1], torch.tensor([1.0, 1.0], dtype=torch.float64) * 4 / math.sqrt(2))
    assert isinstance(EightGaussians(), GaussianMixture)
    w, m, s = Gaussian(Gaussian.Options(dim=3, mean=[1.0, 2.0, 3.0], std=2.0)).mixture()
    assert w.tolist() == [1.0] and m.tolist() == [[1.0, 2.0, 3.0]] and s.tolist() == [2.0]


def test_bounds():
    assert Gaussian(Gaussian.Options(mean=[1.0, -1.0], std=2.0)).bounds() == ((-9.0, 11.0), (-11.0, 9.0))
    assert sum(EightGaussians().bounds(), ()) == pytest.approx((-5.6, 5.6, -5.6, 5.6))
    lo, hi = zip(*Moons().bounds())
    x = Moons(Moons.Options(noise=0.0)).sample(10_000, gen())
    assert (x.min(0).values >= torch.tensor(lo)).all() and (x.max(0).values <= torch.tensor(hi)).all()
    assert x.min(0).values.tolist() == pytest.approx([-math.sqrt(3), -0.75 / math.sqrt(0.5625 - 1 / math.pi)], abs=1e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Gaussian.Options(std=-1.0),
        lambda: Gaussian.Options(dim=2, mean=[0.0, 1.0, 2.0]),
        lambda: Gaussian.Options(dim=0),
        lambda: Checkerboard.Options(scale=0.0),
        lambda: EightGaussians.Options(std=0.0),
        lambda: EightGaussians.Options(radius=-4.0),
        lambda: Moons.Options(noise=-0.1),
        lambda: GaussianMixture.Options(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0]),
        lambda: GaussianMixture.Options(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0], weights=[1.0]),
        lambda: GaussianMixture.Options(means=[[0.0, 0.0], [1.0]], stds=[1.0, 1.0]),
        lambda: GaussianMixture.Options(means=[[0.0], [1.0]], stds=[1.0, -1.0]),
        lambda: GaussianMixture.Options(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=[1.0, 0.0]),
        lambda: GaussianMixture.Options(means=[]),
        lambda: Checkerboard.Options(sclae=2.0),
    ],
)
def test_options_validation(make):
    with pytest.raises(ValidationError):
        make()


def test_validation_message_is_clear():
    with pytest.raises(ValidationError, match="mean has 3 entries but dim is 2"):
        Gaussian.Options(mean=[0.0, 1.0, 2.0])
    with pytest.raises(ValidationError, match="stds has 1 entries but means has 2 components"):
        GaussianMixture.Options(means=[[0.0], [1.0]], stds=[1.0])
