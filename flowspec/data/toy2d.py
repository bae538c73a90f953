"""Toy datasets with known densities: the paper's checkerboard, Gaussian mixtures, and two moons.

Every sampler draws its randomness only from the ``generator`` it is given, so a seeded generator
reproduces a run exactly. Where the density is known, :meth:`cell_mass` gives the exact probability
of each cell of a 2-D histogram grid (float64), which the histogram KL metric compares against.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, PositiveFloat, model_validator

from flowspec.data.base import Dataset, DatasetOptions


def _interval_overlap(edges: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Length of [edges[i], edges[i+1]] intersected with [lo[k], hi[k]]: shape (len(edges) - 1, K)."""
    left = torch.maximum(edges[:-1, None], lo[None, :])
    right = torch.minimum(edges[1:, None], hi[None, :])
    return (right - left).clamp_min(0.0)


def _normal_interval(edges: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """P(edges[i] <= m_k + s_k Z <= edges[i+1]) for Z ~ N(0, 1): shape (K, len(edges) - 1).

    Cells right of the mean use Phi(-a) - Phi(-b) instead of Phi(b) - Phi(a), which keeps the
    relative precision of small upper-tail masses.
    """
    z = (edges[None, :] - mean[:, None]) / std[:, None]
    a, b = z[:, :-1], z[:, 1:]
    upper = torch.special.ndtr(-a) - torch.special.ndtr(-b)
    return torch.where(a > 0, upper, torch.special.ndtr(b) - torch.special.ndtr(a))


class CheckerboardOptions(DatasetOptions):
    scale: PositiveFloat = Field(2.0, description="factor applied to both coordinates (2: board on [-4, 4]^2)")


class Checkerboard(Dataset):
    """The paper's checkerboard (docs/math.md, "The checkerboard").

    x1 ~ U[-2, 2), x2 = U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2), then both coordinates times
    ``scale`` = a: uniform on the 8 squares [a i, a (i + 1)] x [a j, a (j + 1)], i, j in {-2, ..., 1},
    i + j even, of a 4 x 4 board on [-2a, 2a]^2 (total area 8 a^2). Each coordinate is marginally
    uniform on [-2a, 2a], so std = 2a / sqrt(3) per dimension.
    """

    Options = CheckerboardOptions
    options: CheckerboardOptions
    shape = (2,)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, float32, shape (n, 2)."""
        x1 = 4 * torch.rand(n, generator=generator) - 2
        flip = torch.randint(0, 2, (n,), generator=generator)
        x2 = torch.rand(n, generator=generator) - 2 * flip + torch.remainder(torch.floor(x1), 2)
        return self.options.scale * torch.stack([x1, x2], dim=1)

    def std(self) -> torch.Tensor:
        """2 scale / sqrt(3) per dimension, shape (2,)."""
        return torch.full((2,), 2 * self.options.scale / math.sqrt(3))

    def bounds(self) -> tuple[tuple[float, float], ...]:
        """The board, [-2 scale, 2 scale]^2."""
        a = 2 * self.options.scale
        return ((-a, a), (-a, a))

    def cell_mass(self, edges: list[torch.Tensor]) -> torch.Tensor:
        """Exact mass of each cell: area of overlap with the 8 squares / (8 scale^2).

        Overlap areas factor per axis: mass = Ox M Oy^T / (8 a^2), with Ox[i, k] the length of x-cell i
        inside board column k, Oy likewise, and M[k, l] = 1 when k + l is even. Shape (nx - 1, ny - 1).
        """
        a = self.options.scale
        lo = a * torch.arange(-2, 2, dtype=torch.float64)
        ox, oy = (_interval_overlap(e.double(), lo, lo + a) for e in edges)
        k = torch.arange(4)
        board = ((k[:, None] + k[None, :]) % 2 == 0).double()
        return ox @ board @ oy.T / (8 * a * a)


class GaussianMixtureOptions(DatasetOptions):
    means: list[list[float]] = Field(
        [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], min_length=1, description="component means, K lists of D floats"
    )
    stds: list[PositiveFloat] = Field([0.5, 0.5, 0.5], description="isotropic std of each component (K)")
    weights: list[PositiveFloat] | None = Field(
        None, description="component weights (K), normalized by their sum; None: uniform"
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> GaussianMixtureOptions:
        k, dims = len(self.means), {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError(f"means must all have the same positive dimension, got dimensions {sorted(dims)}")
        if len(self.stds) != k:
            raise ValueError(f"stds has {len(self.stds)} entries but means has {k} components")
        if self.weights is not None and len(self.weights) != k:
            raise ValueError(f"weights has {len(self.weights)} entries but means has {k} components")
        return self


class GaussianMixture(Dataset):
    """sum_k w_k N(m_k, s_k^2 I) in D dimensions, from :meth:`mixture` (weights (K,), means (K, D),
    stds (K,)); subclasses only override :meth:`mixture` and their options.

    std (law of total variance), per dimension d: sqrt(sum_k w_k (s_k^2 + m_kd^2) - (sum_k w_k m_kd)^2).
    bounds: per dimension, [min_k (m_kd - p s_k), max_k (m_kd + p s_k)] with p = ``pad`` (4).
    cell_mass (D = 2 only): sum_k w_k Px_k(i) Py_k(j), products of normal CDF differences.
    """

    #: EightGaussians and Gaussian bring options of their own (and their own :meth:`mixture`)
    Options: ClassVar[type[DatasetOptions]] = GaussianMixtureOptions
    pad = 4.0

    def __init__(self, options: DatasetOptions | None = None):
        super().__init__(options)
        self.shape = (self.mixture()[1].shape[1],)

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (K,), means (K, D), stds (K,)), float64; weights sum to 1."""
        o = self.options
        if not isinstance(o, GaussianMixtureOptions):
            raise TypeError(f"{type(self).__name__}: options other than GaussianMixture's need their own mixture()")
        w = torch.tensor(o.weights if o.weights is not None else [1.0] * len(o.means), dtype=torch.float64)
        return w / w.sum(), torch.tensor(o.means, dtype=torch.float64), torch.tensor(o.stds, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, float32, shape (n, D): a component k ~ w, then m_k + s_k z, z ~ N(0, I)."""
        w, m, s = self.mixture()
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, m.shape[1], generator=generator, dtype=torch.float64)
        return (m[k] + s[k, None] * z).float()

    def std(self) -> torch.Tensor:
        """Exact per-dimension std, shape (D,)."""
        w, m, s = self.mixture()
        second = (w[:, None] * (s[:, None] ** 2 + m**2)).sum(0)
        return (second - (w @ m) ** 2).sqrt().float()

    def bounds(self) -> tuple[tuple[float, float], ...]:
        """Box of the component means padded by ``pad`` stds."""
        _, m, s = self.mixture()
        lo, hi = (m - self.pad * s[:, None]).amin(0), (m + self.pad * s[:, None]).amax(0)
        return tuple((float(a), float(b)) for a, b in zip(lo, hi))

    def cell_mass(self, edges: list[torch.Tensor]) -> torch.Tensor | None:
        """Exact mass of each cell of a 2-D grid, shape (nx - 1, ny - 1); None unless D = 2."""
        if self.shape != (2,):
            return None
        w, m, s = self.mixture()
        px, py = (_normal_interval(e.double(), m[:, d], s) for d, e in enumerate(edges))
        return torch.einsum("k,ki,kj->ij", w, px, py)


class EightGaussiansOptions(DatasetOptions):
    radius: PositiveFloat = Field(4.0, description="distance of each center from the origin")
    std: PositiveFloat = Field(0.4, description="isotropic std of each component")


class EightGaussians(GaussianMixture):
    """8 equal-weight components N(r (cos(k pi/4), sin(k pi/4)), std^2 I), k = 0, ..., 7."""

    Options = EightGaussiansOptions
    options: EightGaussiansOptions

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (8,), means (8, 2), stds (8,)), float64."""
        angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
        means = self.options.radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        stds = torch.full((8,), self.options.std, dtype=torch.float64)
        return torch.full((8,), 1 / 8, dtype=torch.float64), means, stds


class GaussianOptions(DatasetOptions):
    dim: int = Field(2, gt=0, description="dimension D")
    mean: float | list[float] = Field(0.0, description="mean: one float for every coordinate, or D floats")
    std: PositiveFloat = Field(1.0, description="isotropic standard deviation")

    @model_validator(mode="after")
    def _check_mean(self) -> GaussianOptions:
        if isinstance(self.mean, list) and len(self.mean) != self.dim:
            raise ValueError(f"mean has {len(self.mean)} entries but dim is {self.dim}")
        return self


class Gaussian(GaussianMixture):
    """N(mean, std^2 I) in ``dim`` dimensions: a one-component mixture. bounds: mean +- 5 std."""

    Options = GaussianOptions
    options: GaussianOptions
    pad = 5.0

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (1,), means (1, D), stds (1,)), float64."""
        o = self.options
        mean = torch.as_tensor(o.mean, dtype=torch.float64).expand(o.dim).reshape(1, o.dim)
        return torch.ones(1, dtype=torch.float64), mean, torch.full((1,), o.std, dtype=torch.float64)


class MoonsOptions(DatasetOptions):
    noise: float = Field(0.05, ge=0.0, description="std of the Gaussian noise added before rescaling")


class Moons(Dataset):
    """Two interleaved half circles (scikit-learn's make_moons shape), standardized per axis.

    Label c ~ Bernoulli(1/2), angle u ~ U[0, pi]; moon c = 0 is (cos u, sin u), moon c = 1 is
    (1 - cos u, 1/2 - sin u); then noise N(0, noise^2 I) is added. The noiseless shape has mean
    (1/2, 1/4) and variances (3/4, 9/16 - 1/pi); the output is the exact affine map
        y = ((x_1 - 1/2) / sqrt(3/4), (x_2 - 1/4) / sqrt(9/16 - 1/pi)),
    so the mean is 0 and std_d = sqrt(1 + noise^2 / v_d) with v = (3/4, 9/16 - 1/pi).
    The density has no closed form (cell_mass is None).
    """

    Options = MoonsOptions
    options: MoonsOptions
    shape = (2,)
    center = (0.5, 0.25)
    half_width = (1.5, 0.75)  # the noiseless shape spans center +- half_width
    variance = (0.75, 0.5625 - 1 / math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples, float32, shape (n, 2)."""
        c = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64)
        u = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = torch.stack([c + (1 - 2 * c) * u.cos(), c / 2 + (1 - 2 * c) * u.sin()], dim=1)
        x = x + self.options.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        center = torch.tensor(self.center, dtype=torch.float64)
        return ((x - center) / torch.tensor(self.variance, dtype=torch.float64).sqrt()).float()

    def std(self) -> torch.Tensor:
        """sqrt(1 + noise^2 / v_d), shape (2,)."""
        return torch.tensor([math.sqrt(1 + self.options.noise**2 / v) for v in self.variance])

    def bounds(self) -> tuple[tuple[float, float], ...]:
        """The noiseless shape's box padded by 4 noise stds, in output coordinates."""
        return tuple(
            (-(h + 4 * self.options.noise) / math.sqrt(v), (h + 4 * self.options.noise) / math.sqrt(v))
            for h, v in zip(self.half_width, self.variance)
        )
