"""Exact velocities b_t(x) = E[dI_t/dt | I_t = x] of targets with a closed form (docs/math.md, "Exact oracles").

With I_t = alpha_t x0 + beta_t x1, x0 ~ N(0, diag(c)^2) (c a scalar or per-dimension, shape (D,)),

    b_t(x) = alphadot_t E[x0 | I_t = x] + betadot_t E[x1 | I_t = x].

Gaussian mixtures sum_k w_k N(m_k, s_k^2 I) (``Gaussian``, ``GaussianMixture``, ``EightGaussians``: any
dataset with ``mixture()``): given component k, I_t is Gaussian with per-dimension variance
v_kd = alpha^2 c_d^2 + beta^2 s_k^2, and

    p(k | x) ∝ w_k prod_d N(x_d; beta m_kd, v_kd)                       (log-sum-exp)
    E[x1_d | x, k] = m_kd + beta s_k^2 (x_d - beta m_kd) / v_kd
    E[x0_d | x, k] = alpha c_d^2 (x_d - beta m_kd) / v_kd

which is finite for every t in [0, 1] (no clamping).

Checkerboard (uniform on 8 squares Q_k = [lo_k1, hi_k1] x [lo_k2, hi_k2]): as a function of x1 the
likelihood N(x; beta x1, alpha^2 c^2) is N(x1; m, sigma^2) with m = x / beta, sigma = alpha c / beta,
so the posterior of x1 given x is, on each square, a product of per-axis truncated normals:

    a_kd = (lo_kd - m_d) / sigma_d,  b_kd = (hi_kd - m_d) / sigma_d,  Z_kd = Phi(b_kd) - Phi(a_kd)
    p(k | x) ∝ prod_d Z_kd                                             (log space, log_ndtr)
    R_kd = (phi(a_kd) - phi(b_kd)) / Z_kd
    E[x1_d | x, k] = m_d + sigma_d R_kd,   E[x0_d | x, k] = -c_d R_kd

(the second from x0 = (x - beta x1) / alpha, with no division by alpha). m and sigma divide by beta,
so times are clamped to [eps, 1 - eps] with eps = 1e-6 (choice): beyond that the velocity is
constant in t to within O(eps).

Everything is computed in float64 and returned in the dtype of x.
"""

from __future__ import annotations

import math

import torch

from flowspec.data.base import Dataset
from flowspec.interpolants import Interpolant

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a <= b, accurate in both tails and for narrow intervals.

    Intervals right of 0 are mirrored to (-b, -a); then log Phi(b) + log(-expm1(log Phi(a) - log Phi(b))).
    """
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log(-torch.expm1((la - lb).clamp_max(-1e-300)))


def _log_phi(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z * z - _LOG_SQRT_2PI


class ExactVelocity:
    """b_t(x) of a known target; a :class:`flowspec.objectives.base.Teacher` (its map: its ODE, integrated).

    Args:
        interpolant: any Interpolant (``coefficients`` is used).
        scale: base scale c, a scalar or a tensor of shape (D,).
    """

    eps = 1e-6
    #: the dtype to evaluate this velocity in when integrating it (it computes in float64 anyway)
    eval_dtype = torch.float64

    def __init__(self, interpolant: Interpolant, scale):
        self.interpolant = interpolant
        self.scale = torch.as_tensor(scale, dtype=torch.float64).detach().cpu()

    def posterior_means(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | I_t = x], E[x1 | I_t = x]), both (B, D) float64, for t (B,) and x (B, D) float64."""
        raise NotImplementedError

    @torch.no_grad()
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b_t(x) for t of shape (B,) (or a scalar) and x of shape (B, D); dtype and device of x."""
        xd = x.detach().to(torch.float64)
        td = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        e0, e1 = self.posterior_means(td, xd)
        k = self.interpolant.coefficients(td)
        b = k.alpha_dot[:, None] * e0 + k.beta_dot[:, None] * e1
        return b.to(x.dtype)

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map velocity of the exact flow map, (X_{s,t}(x) - x) / (t - s): this velocity's ODE
        integrated per sample (flowspec.ode.map_velocity, dopri5 at 1e-7)."""
        from flowspec.ode import map_velocity

        return map_velocity(self.velocity, s, t, x, eval_dtype=torch.float64)[0]

    def _c(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.device).expand(x.shape[1])


class MixtureVelocity(ExactVelocity):
    """Exact velocity of sum_k w_k N(m_k, s_k^2 I): weights (K,), means (K, D), stds (K,)."""

    def __init__(self, interpolant: Interpolant, scale, weights, means, stds):
        super().__init__(interpolant, scale)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)

    def posterior_means(self, t, x):
        k = self.interpolant.coefficients(t)
        al, be = k.alpha[:, None, None], k.beta[:, None, None]          # (B, 1, 1)
        c2 = self._c(x).pow(2)                                          # (D,)
        m = self.means.to(x.device)[None]                               # (1, K, D)
        s2 = self.stds.to(x.device).pow(2)[None, :, None]               # (1, K, 1)
        var = al**2 * c2 + be**2 * s2                                   # (B, K, D)
        dev = x[:, None, :] - be * m                                    # (B, K, D)
        logp = self.weights.to(x.device).log()[None] - 0.5 * (dev**2 / var + var.log()).sum(-1)
        post = torch.softmax(logp, dim=1)[..., None]                    # (B, K, 1)
        e1 = (post * (m + be * s2 * dev / var)).sum(1)
        e0 = (post * (al * c2 * dev / var)).sum(1)
        return e0, e1


class BoxesVelocity(ExactVelocity):
    """Exact velocity of a uniform density on a union of disjoint axis-aligned boxes (the
    checkerboard): lo, hi of shape (K, D)."""

    def __init__(self, interpolant: Interpolant, scale, lo, hi):
        super().__init__(interpolant, scale)
        self.lo = torch.as_tensor(lo, dtype=torch.float64)
        self.hi = torch.as_tensor(hi, dtype=torch.float64)

    def posterior_means(self, t, x):
        t = t.clamp(self.eps, 1 - self.eps)
        k = self.interpolant.coefficients(t)
        al, be = k.alpha[:, None, None], k.beta[:, None, None]
        c = self._c(x)                                                  # (D,)
        m = (x / be[:, 0])[:, None, :]                                  # (B, 1, D)
        sig = al * c / be                                               # (B, 1, D)
        a = (self.lo.to(x.device)[None] - m) / sig                      # (B, K, D)
        b = (self.hi.to(x.device)[None] - m) / sig
        logz = log_normal_interval(a, b)                                # (B, K, D)
        # the data density is constant on the union, so box k's posterior mass is prod_d Z_kd
        post = torch.softmax(logz.sum(-1), dim=1)[..., None]            # (B, K, 1)
        r = torch.exp(_log_phi(a) - logz) - torch.exp(_log_phi(b) - logz)
        e1 = (post * (m + sig * r)).sum(1)
        e0 = -(post * r).sum(1) * c
        return e0, e1


def checkerboard_boxes(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 squares [a i, a (i + 1)] x [a j, a (j + 1)], i + j even, i, j in {-2..1}: (lo, hi), (8, 2)."""
    cells = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    lo = scale * torch.tensor(cells, dtype=torch.float64)
    return lo, lo + scale


def exact_velocity(dataset: Dataset, interpolant: Interpolant, scale) -> ExactVelocity | None:
    """The exact velocity of ``dataset`` under ``interpolant`` with base scale c, or None when the
    dataset has no closed form. A dataset (a plugin's too) may provide its own by defining
    ``exact_velocity(interpolant, scale)``."""
    from flowspec.data.toy2d import Checkerboard

    own = getattr(dataset, "exact_velocity", None)
    if callable(own):
        return own(interpolant, scale)
    if isinstance(dataset, Checkerboard):
        return BoxesVelocity(interpolant, scale, *checkerboard_boxes(dataset.options.scale))
    mixture = getattr(dataset, "mixture", None)
    if callable(mixture):
        return MixtureVelocity(interpolant, scale, *mixture())
    return None
