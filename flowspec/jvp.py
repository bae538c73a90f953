"""The one place forward-mode derivatives are taken (DESIGN.md, "Conventions").

``jvp(f, primals, tangents)`` returns (f(primals), J_f(primals) . tangents). Two strategies:

* ``"exact"``: ``torch.func.jvp`` (forward-mode AD). Reverse-mode gradients flow through both
  outputs to any parameters f closes over, which is what the Lagrangian and Eulerian losses need.
* ``"finite_difference"``: central differences (f(p + h u) - f(p - h u)) / 2h, for networks whose
  operations lack forward-AD rules. Evaluated in the primals' dtype: use float64 primals and a
  float64 network (in float32 the derivative keeps only a few digits). The default h is
  eps^(1/3) / 1000 of that dtype: eps^(1/3) balances the O(h^2) truncation error against rounding
  for a function varying on a unit scale, and time embeddings oscillate up to 1000 times faster
  (sin(1000 t w)). Costs two extra evaluations of f. For a float64 derivative of a network trained
  in float32, train in float64 (``train.precision = "float64"``).

Mixed precision: under autocast (``train.precision = "bf16"``) both strategies switch autocast off
for their evaluations of f, so the derivative is taken in the network's own dtype (float32):
bfloat16 forward-mode tangents and bfloat16 differences keep only 2-3 digits. The exact strategy
also forces the math backend of ``scaled_dot_product_attention`` (flash and memory-efficient
attention have no forward-AD rule). :func:`active` tells a module it is being differentiated, so a
compiled network can fall back to its eager form inside the jvp (flowspec.flowmap).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Strategy = Literal["exact", "finite_difference"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("flowspec_jvp_active", default=False)


def active() -> bool:
    """True while :func:`jvp` evaluates f (for modules that must run eagerly in float32 then)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def derivative_mode(exact: bool) -> Iterator[None]:
    """Autocast off on every device where it is on; for exact jvps the math attention backend."""
    token = _ACTIVE.set(True)
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            if exact:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
    finally:
        _ACTIVE.reset(token)


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
    # a tangent computed under autocast (a bf16 teacher velocity) takes its primal's dtype
    tangents = tuple(u.to(p.dtype) if u.dtype != p.dtype else u for p, u in zip(primals, tangents))
    if strategy == "exact":
        with derivative_mode(exact=True):
            return torch.func.jvp(f, primals, tangents)
    if strategy == "finite_difference":
        with derivative_mode(exact=False):
            return _central_difference(f, primals, tangents, step)
    raise ValueError(f"unknown jvp strategy {strategy!r} (valid: exact, finite_difference)")


def _central_difference(f, primals, tangents, step):
    """(f(p), (f(p + h u) - f(p - h u)) / 2h)."""
    out = f(*primals)
    h = step if step is not None else torch.finfo(primals[0].dtype).eps ** (1 / 3) / 1000
    plus = f(*(p + h * u for p, u in zip(primals, tangents)))
    minus = f(*(p - h * u for p, u in zip(primals, tangents)))
    return out, (plus - minus) / (2 * h)
