"""Targets whose flow maps mix coordinates: a full-covariance Gaussian with an anisotropic base (exact
velocity and exact affine flow map) and a Gaussian mixture (exact velocity, float64 ODE ground truth).

Full-covariance Gaussian. Base x0 = W z0 with W = diag(c) (per-coordinate base scales c), data
x1 = mu + W Q diag(sigma) z1 with Q a rotation and z0, z1 ~ N(0, I). In whitened coordinates
y = W^-1 x the base is isotropic, and the data covariance Q diag(sigma^2) Q^T has eigenvectors Q, so
along each column q_i of Q the problem is a one-dimensional Gaussian with base scale 1 and data std
sigma_i. With s_i(t) = sqrt(alpha_t^2 + beta_t^2 sigma_i^2) and the (B, D, D) matrices

    M_t[k] = W Q diag(k_i) Q^T W^-1          (the linear map "multiply by k_i along W q_i")

the velocity and the flow map are

    b_t(x)     = betadot_t mu + M[sdot_i(t) / s_i(t)] (x - beta_t mu)
    X_{s,t}(x) = beta_t mu + M[s_i(t) / s_i(s)] (x - beta_s mu)

affine in x with Jacobian W Q diag(.) Q^T W^-1: dense, and not symmetric unless the base is
isotropic, so a vector-Jacobian product differs from a Jacobian-vector product (a residual that
confuses them is not zero at this map). The map velocity (X - x) / (t - s) is computed with divided
differences (no cancellation near s = t), as for :class:`~flowspec.testing.GaussianOracle`.
"""

from __future__ import annotations

import torch

from flowspec.interpolants import Interpolant, expand_as
from flowspec.testing.oracles import GaussianOracle

F64 = torch.float64


def random_rotation(dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A rotation Q (D, D), float64, det +1, from the QR factorization of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=F64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class CorrelatedGaussianOracle:
    """Exact quantities for the full-covariance Gaussian target above; a ``Teacher`` (its
    ``velocity`` is b_t, its ``v`` the exact map velocity). Vectors only: x of shape (B, D).

    Args:
        interpolant: any Interpolant.
        mu: data mean, (D,).
        c: base scales, (D,) (x0 ~ N(0, diag(c)^2)).
        rotation: Q, (D, D) orthogonal.
        sigma: data stds along the whitened axes, (D,).
    """

    def __init__(self, interpolant: Interpolant, mu, c, rotation, sigma):
        self.interpolant = interpolant
        self.mu = torch.as_tensor(mu, dtype=F64)
        self.dim = self.mu.shape[0]
        self.c = torch.as_tensor(c, dtype=F64).expand(self.dim).clone()
        self.rotation = torch.as_tensor(rotation, dtype=F64)
        self.sigma = torch.as_tensor(sigma, dtype=F64).expand(self.dim).clone()
        # GaussianOracle's divided differences of alpha, beta (they only read the interpolant)
        self._dd = GaussianOracle(interpolant, 0.0, 1.0)._divided_differences

    def describe(self) -> str:
        r = lambda v: [round(float(a), 3) for a in v]  # noqa: E731
        return (f"{type(self.interpolant).__name__} correlated N(mu={r(self.mu)}, sigma={r(self.sigma)}), "
                f"c={r(self.c)}")

    def _apply(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """M[k] x = W Q diag(k) Q^T W^-1 x per sample; k (B, D) or (D,), x (B, D)."""
        q, c = self.rotation.to(x), self.c.to(x)
        return ((x / c) @ q * k.to(x)) @ q.T * c

    def _std(self, t: torch.Tensor) -> torch.Tensor:
        """s_i(t) = sqrt(alpha^2 + beta^2 sigma_i^2), (B, D)."""
        k = self.interpolant.coefficients(t)
        return torch.sqrt(k.alpha[:, None] ** 2 + k.beta[:, None] ** 2 * self.sigma.to(t) ** 2)

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b_t(x) = betadot mu + M[sdot_i / s_i](x - beta mu), (B, D)."""
        k, mu = self.interpolant.coefficients(t), self.mu.to(x)
        var = k.alpha[:, None] ** 2 + k.beta[:, None] ** 2 * self.sigma.to(x) ** 2
        rate = (k.alpha[:, None] * k.alpha_dot[:, None]
                + k.beta[:, None] * k.beta_dot[:, None] * self.sigma.to(x) ** 2) / var
        return k.beta_dot[:, None] * mu + self._apply(rate, x - k.beta[:, None] * mu)

    def flow(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """X_{s,t}(x) = beta_t mu + M[s_i(t) / s_i(s)](x - beta_s mu), (B, D)."""
        bs, bt = self.interpolant.coefficients(s).beta, self.interpolant.coefficients(t).beta
        mu = self.mu.to(x)
        return bt[:, None] * mu + self._apply(self._std(t) / self._std(s), x - bs[:, None] * mu)

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact map velocity (X_{s,t}(x) - x) / (t - s), = b_s(x) on the diagonal, (B, D)."""
        ks, kt = self.interpolant.coefficients(s), self.interpolant.coefficients(t)
        da, db = self._dd(s, t)
        ss, st = self._std(s), self._std(t)
        sig2 = self.sigma.to(x) ** 2
        dstd = (da[:, None] * (kt.alpha + ks.alpha)[:, None]
                + sig2 * db[:, None] * (kt.beta + ks.beta)[:, None]) / (st + ss)
        mu = self.mu.to(x)
        return db[:, None] * mu + self._apply(dstd / ss, x - ks.beta[:, None] * mu)

    def conditional_mean(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | I_t = x], E[x1 | I_t = x]), each (B, D): along each whitened axis,
        E[z0_i | .] = alpha p_i / s_i^2 and E[(W^-1 x1)_i | .] = (W^-1 mu)_i + beta sigma_i^2 p_i / s_i^2,
        p = Q^T W^-1 (x - beta mu). Gaussian conditioning: (2 m0 - x0, 2 m1 - x1) is an antithetic pair."""
        k, mu = self.interpolant.coefficients(t), self.mu.to(x)
        var = self._std(t) ** 2
        dev = x - k.beta[:, None] * mu
        m0 = self._apply(k.alpha[:, None] / var, dev)
        m1 = mu + self._apply(k.beta[:, None] * self.sigma.to(x) ** 2 / var, dev)
        return m0, m1

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x1 = mu + W Q diag(sigma) z1: (n, D) float64."""
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return self.mu + (z * self.sigma) @ self.rotation.T * self.c

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 = W z0: (n, D) float64."""
        return self.c * torch.randn(n, self.dim, generator=generator, dtype=F64)


class MixtureOracle:
    """A Gaussian mixture sum_k w_k N(m_k, s_k^2 I) with base N(0, diag(c)^2): exact velocity b_t
    (posterior-weighted conditional means, flowspec.data.analytic.MixtureVelocity), exact map only
    through the ODE: :meth:`flow` is float64 dopri5 at ``tol`` (its velocity is smooth on [0, 1]).

    Args:
        interpolant: any Interpolant.
        weights: (K,) positive, summing to 1; means: (K, D); stds: (K,); c: (D,) or a scalar.
    """

    def __init__(self, interpolant: Interpolant, weights, means, stds, c=1.0, tol: float = 1e-10):
        from flowspec.data.analytic import MixtureVelocity

        self.interpolant = interpolant
        self.weights = torch.as_tensor(weights, dtype=F64)
        self.means = torch.as_tensor(means, dtype=F64)
        self.stds = torch.as_tensor(stds, dtype=F64)
        self.dim = self.means.shape[1]
        self.c = torch.as_tensor(c, dtype=F64).expand(self.dim).clone()
        self.tol = tol
        self._exact = MixtureVelocity(interpolant, self.c, self.weights, self.means, self.stds)

    def describe(self) -> str:
        return (f"{type(self.interpolant).__name__} mixture of {len(self.weights)} Gaussians in "
                f"{self.dim}-D, c={[round(float(a), 3) for a in self.c]}")

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b_t(x) = alphadot E[x0 | I_t = x] + betadot E[x1 | I_t = x], (B, D), x's dtype."""
        return self._exact.velocity(t, x)

    def flow(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Ground-truth X_{s,t}(x): float64 dopri5 at rtol = atol = tol, per sample in normalised time."""
        from flowspec.ode import TeacherMapOptions, map_velocity

        v, _ = map_velocity(self.velocity, s.double(), t.double(), x.double(),
                            TeacherMapOptions(solver="dopri5", tol=self.tol))
        return (x.double() + expand_as(t - s, x).double() * v).to(x.dtype)

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Ground-truth map velocity (X_{s,t}(x) - x) / (t - s), by the same solve, (B, D)."""
        from flowspec.ode import TeacherMapOptions, map_velocity

        return map_velocity(self.velocity, s.double(), t.double(), x.double(),
                            TeacherMapOptions(solver="dopri5", tol=self.tol))[0].to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) float64 draws of the mixture."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return self.means[k] + self.stds[k, None] * z

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 ~ N(0, diag(c)^2): (n, D) float64."""
        return self.c * torch.randn(n, self.dim, generator=generator, dtype=F64)


def correlated_gaussian(interpolant: Interpolant, dim: int = 3, seed: int = 0) -> CorrelatedGaussianOracle:
    """A seeded full-covariance Gaussian in ``dim`` dimensions: mu in [-1, 1]^D, c in [0.5, 1.5]^D,
    sigma in [0.4, 2]^D (anisotropic), a random rotation."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(dim, generator=g, dtype=F64)  # noqa: E731
    return CorrelatedGaussianOracle(interpolant, u(-1.0, 1.0), u(0.5, 1.5), random_rotation(dim, g), u(0.4, 2.0))


__all__ = ["CorrelatedGaussianOracle", "MixtureOracle", "correlated_gaussian", "random_rotation"]
