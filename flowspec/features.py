"""Feature statistics and the Fréchet distance between Gaussians fitted to features.

Fréchet distance between N(mu1, S1) and N(mu2, S2) (the squared 2-Wasserstein distance):

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}),

computed in float64 through symmetric eigendecompositions (no non-symmetric matrix square root).
FID is this distance on Inception-v3 pool features (flowspec.inception); the digits Fréchet distance
uses the penultimate layer of a small classifier that flowspec trains on scikit-learn's digits
(:func:`digits_classifier`), so quality is measurable offline.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import nn


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}); means (D,), covariances (D, D)."""
    mu1, mu2, cov1, cov2 = (a.double() for a in (mu1, mu2, cov1, cov2))
    r1 = _sqrt_psd(cov1)
    w = torch.linalg.eigvalsh(r1 @ cov2 @ r1)
    cross = w.clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross)


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) of features (N, D), in float64."""
    f = features.double()
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {f.shape[0]}")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def batched_features(extract: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int,
                     description: str | None = None) -> torch.Tensor:
    """extract(x[i : i + batch]) concatenated over batches, (N, ...) -> (N, D), with a progress bar on
    a terminal when ``description`` is given."""
    chunks = list(x.split(batch))
    out = []
    if description is None:
        return torch.cat([extract(c) for c in chunks])
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, disable=not console.is_terminal, transient=True) as progress:
        task = progress.add_task(description, total=len(chunks))
        for c in chunks:
            out.append(extract(c))
            progress.advance(task)
    return torch.cat(out)


# -- the digits classifier ---------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    """MLP on 8 x 8 digits in [-1, 1]: (N, 1, 8, 8) -> features (N, 64) -> logits (N, 10).

    features(x) = tanh(W2 tanh(W1 x + b1) + b2), logits = W3 features + b3."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh())
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            for m in (*self.body, self.head):
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) / m.in_features ** 0.5)
                    m.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@lru_cache(maxsize=1)
def digits_classifier(steps: int = 400, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train the digits classifier on all 1797 of scikit-learn's digits (full-batch Adam, lr 1e-2,
    cross-entropy, float32 on the CPU, fixed seed: the same weights in every process). Cached.

    Returns:
        (the classifier in eval mode without gradients, its training accuracy).
    """
    from flowspec.data.images import Digits

    data = Digits()
    x, y = data.all(), data.labels()
    model = DigitsClassifier(torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return model, accuracy
