"""The one place forward-mode derivatives are taken (DESIGN.md, "Conventions").

``jvp(f, primals, tangents)`` returns (f(primals), J_f(primals) . tangents). Two strategies:

* ``"exact"``: ``torch.func.jvp`` (forward-mode AD). Reverse-mode gradients flow through both
  outputs to any parameters f closes over, which is what the Lagrangian and Eulerian losses need.
* ``"finite_difference"``: central differences (f(p + h u) - f(p - h u)) / 2h, for networks whose
  operations lack forward-AD rules. Evaluated in the primals' dtype: use float64 primals and a
  float64 network (in float32 the derivative keeps only a few digits). The default h is
  eps^(1/3) / 1000 of that dtype: eps^(1/3) balances the O(h^2) truncation error against rounding
  for a function varying on a unit scale, and time embeddings oscillate up to 1000 times faster
  (sin(1000 t w)). Costs two extra evaluations of f.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

Strategy = Literal["exact", "finite_difference"]


def jvp(
    f: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    strategy: Strategy = "exact",
    step: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and directional derivative of f at ``primals`` along ``tangents``.

    Args:
        f: function of len(primals) tensors returning one tensor.
        primals: points, each any shape.
        tangents: directions, shaped like the primals.
        strategy: "exact" or "finite_difference".
        step: h for finite differences (default eps^(1/3) / 1000 of the primals' dtype).
    Returns:
        (f(p), d/de f(p + e u) at e = 0), in f's output dtype.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError("jvp needs one tangent per primal")
    if strategy == "exact":
        return torch.func.jvp(f, primals, tangents)
    if strategy == "finite_difference":
        out = f(*primals)
        h = step if step is not None else torch.finfo(primals[0].dtype).eps ** (1 / 3) / 1000
        plus = f(*(p + h * u for p, u in zip(primals, tangents)))
        minus = f(*(p - h * u for p, u in zip(primals, tangents)))
        return out, (plus - minus) / (2 * h)
    raise ValueError(f"unknown jvp strategy {strategy!r} (valid: exact, finite_difference)")
