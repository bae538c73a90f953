"""The one place forward-mode derivatives are taken (docs/design.md, "Conventions").

``jvp(f, primals, tangents)`` returns (f(primals), J_f(primals) . tangents). Two strategies:

* ``"exact"``: forward-mode AD with dual tensors (``torch.autograd.forward_ad``). Reverse-mode
  gradients flow through both outputs to any parameters f closes over, which is what the
  Lagrangian and Eulerian losses need. Layers built from :func:`linear` / :class:`Linear` and
  :func:`conv2d` propagate a tangent u with one product, W u: PyTorch's generic rules also
  multiply by the weight's tangent, an all-zero tensor here, which took a jvp through the 4 x 512
  MLP from about 2 to about 3.4 forward passes on the CPU.
* ``"finite_difference"``: central differences (f(p + h u) - f(p - h u)) / 2h, for networks whose
  operations lack forward-AD rules. Evaluated in the primals' dtype: use float64 primals and a
  float64 network (in float32 the derivative keeps only a few digits). The default h is
  eps^(1/3) / 1000 of that dtype: eps^(1/3) balances the O(h^2) truncation error against rounding
  for a function varying on a unit scale, and time embeddings oscillate up to 1000 times faster
  (sin(1000 t w)). Costs two extra evaluations of f. For a float64 derivative of a network trained
  in float32, train in float64 (``train.precision = "float64"``).

Randomness (dropout): a jvp is the derivative of one function, so every evaluation of f must draw
the same random numbers. The exact strategy evaluates f once. The finite-difference strategy
evaluates f(p + h u) and f(p - h u) each under :func:`torch.random.fork_rng` of the default
generators of the CPU and of the primals' devices, so both start from the state the jvp was called
with, and f(p) last, which draws those numbers a third time and leaves the generators where one
forward pass of f leaves them: the same state as after the exact strategy, or f(p) alone. (A
difference of two different dropout masks is of order 1 / h, not a derivative.) Generators that f
creates or is passed itself, and Python's and NumPy's, are f's to keep fixed.

Mixed precision: under autocast (``train.precision = "bf16"``) both strategies switch autocast off
for their evaluations of f, so the derivative is taken in the network's own dtype (float32):
bfloat16 forward-mode tangents and bfloat16 differences keep only 2-3 digits. The exact strategy
evaluates attention written out (:func:`attention`: flash and memory-efficient attention have
no forward-AD rule, and the math kernel's rule breaks the backward pass). :func:`active` tells a
module it is being differentiated, so a compiled network can fall back to its eager form inside
the jvp (flowspec.flowmap).

Compiled (``train.compile``: the whole loss under ``torch.compile``, flowspec.parallel): inside a
traced region :func:`jvp` takes the same strategies without the context variable (dynamo cannot
trace one; :func:`active` then reads a module global), enters the dual level with an explicit
level, and copies each primal (AOT autograd fails on a dual tensor whose primal is a view). The
eager path is unchanged, bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

Strategy = Literal["exact", "finite_difference"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("flowspec_jvp_active", default=False)
#: the same flag while torch.compile traces a jvp: dynamo cannot trace a ContextVar, and a plain
#: module global is traced (read and restored) within the graph (see :func:`jvp`, "compiled")
_TRACED_ACTIVE = False


def active() -> bool:
    """True while :func:`jvp` evaluates f (for modules that must run eagerly in float32 then)."""
    if torch.compiler.is_compiling():
        return _TRACED_ACTIVE
    return _ACTIVE.get()


@contextlib.contextmanager
def derivative_mode() -> Iterator[None]:
    """Autocast off on every device where it is on, and :func:`active` true."""
    token = _ACTIVE.set(True)
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
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
    if torch.compiler.is_compiling():  # a whole loss under torch.compile (train.compile)
        return _traced(f, primals, tangents, strategy, step)
    if strategy == "exact":
        with derivative_mode():
            return _forward_mode(f, primals, tangents)
    if strategy == "finite_difference":
        with derivative_mode():
            return _central_difference(f, primals, tangents, step)
    raise ValueError(f"unknown jvp strategy {strategy!r} (valid: exact, finite_difference)")


def _traced(f, primals, tangents, strategy, step):
    """:func:`jvp` as torch.compile traces it, without graph breaks: the same strategies and
    autocast off, with :func:`active` read from a module global instead of the context variable."""
    global _TRACED_ACTIVE
    outer = _TRACED_ACTIVE
    _TRACED_ACTIVE = True
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            if strategy == "exact":
                # a primal that is a view (t[n_diag:]) fails AOT autograd's tracing of dual tensors
                # (an internal assert on the tangent's layout); a copy traces, and costs nothing fused
                return _forward_mode(f, tuple(p.clone() for p in primals), tangents)
            if strategy == "finite_difference":
                return _central_difference(f, primals, tangents, step)
        raise ValueError(f"unknown jvp strategy {strategy!r} (valid: exact, finite_difference)")
    finally:
        _TRACED_ACTIVE = outer


def _forward_mode(f, primals, tangents):
    """(f(p), J_f(p) u) through dual tensors p + e u; a zero tangent where f ignores its inputs."""
    with fwAD.dual_level() as level:  # explicit: dynamo may hold a stale copy of the current level
        duals = []
        for p, u in zip(primals, tangents):
            duals.append(fwAD.make_dual(p, u, level=level))
        out = f(*duals)
        value, tangent = fwAD.unpack_dual(out, level=level)
    return value, (torch.zeros_like(value) if tangent is None else tangent)


def _affine(op: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, **options) -> torch.Tensor:
    """op(x, weight, bias) for an op affine in x, with the tangent op(u, weight, None) for an input
    tangent u: one product. Falls back to op itself where the weight or bias carries a tangent of
    its own (a jvp in the parameters) or x carries none."""
    if torch.compiler.is_compiling() and not _TRACED_ACTIVE:
        return op(x, weight, bias, **options)  # no jvp traced: reading the dual level would fix it stale
    primal, u = fwAD.unpack_dual(x)
    if u is None or any(fwAD.unpack_dual(w).tangent is not None for w in (weight, bias) if w is not None):
        return op(x, weight, bias, **options)
    return fwAD.make_dual(op(primal, weight, bias, **options), op(u, weight, None, **options))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` = x W^T + b, (..., in) -> (..., out), with the one-product tangent u W^T."""
    return _affine(F.linear, x, weight, bias)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **options) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, **options)``, (B, in, H, W) -> (B, out, H', W'), with the
    one-convolution tangent conv2d(u, weight)."""
    return _affine(F.conv2d, x, weight, bias, **options)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions, (..., L, d) -> (..., L, d).

    ``F.scaled_dot_product_attention`` outside a jvp; written out inside one, softmax included,
    because no fused kernel has a forward-AD rule, and the forward-AD rules of the math kernel and
    of ``torch.softmax`` overwrite a tensor that the backward pass needs (reverse mode through a
    dual-tensor tangent then fails). Networks with attention call this, not SDPA or softmax."""
    # under torch.compile active() reads a module global (no graph break): a compiled loss traces
    # its jvps with attention written out, and a compiled network's plain passes with SDPA
    if not active():
        return F.scaled_dot_product_attention(q, k, v)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    e = (logits - logits.amax(-1, keepdim=True).detach()).exp()  # softmax's own forward-AD rule
    return (e / e.sum(-1, keepdim=True)) @ v  # writes in place into a tensor the backward needs


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) with the cheap tangent of :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _central_difference(f, primals, tangents, step):
    """(f(p), (f(p + h u) - f(p - h u)) / 2h), every evaluation from the same random state (the
    module docstring, "Randomness"); the generators end as one evaluation of f leaves them."""
    h = step if step is not None else torch.finfo(primals[0].dtype).eps ** (1 / 3) / 1000
    with same_random_state(primals):
        plus = f(*(p + h * u for p, u in zip(primals, tangents)))
    with same_random_state(primals):
        minus = f(*(p - h * u for p, u in zip(primals, tangents)))
    out = f(*primals)  # last: from the same state, and advancing it as one forward pass does
    return out, (plus - minus) / (2 * h)


@contextlib.contextmanager
def same_random_state(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Restore, on exit, the default generators of the CPU and of the devices ``tensors`` are on
    (:func:`torch.random.fork_rng` for each device type: only the devices in use are touched)."""
    devices: dict[str, list[int]] = {}
    for x in tensors:
        kind = x.device.type
        if kind in ("cpu", "meta"):
            continue
        index = x.device.index if x.device.index is not None else torch.get_device_module(kind).current_device()
        if index not in devices.setdefault(kind, []):
            devices[kind].append(index)
    with contextlib.ExitStack() as stack:
        for kind, indices in (devices or {"cpu": []}).items():  # each also forks the CPU's generator
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=kind))
        yield
