"""The flow map X_{s,t}(x) = x + (t - s) v_{s,t}(x) (docs/math.md, "Flow map and its parameterization").

The FlowMap wraps any network ``net(x, s, t) -> v`` (x of shape (B, ...), s and t of shape (B,))
and owns the parameterization and sampling. Objectives talk to the FlowMap, never to the network.
With a preconditioning scale c the map is X = x + (t - s) c net(x / c, s, t) (images use c = 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowspec import jvp
from flowspec.interpolants import expand_as


class FlowMap(nn.Module):
    """X_{s,t}(x) = x + (t - s) v_{s,t}(x), hence X_{s,s} = id exactly and v_{t,t} = b_t at the optimum.

    Args:
        net: module called as ``net(x, s, t)`` returning a tensor shaped like x.
        scale: preconditioning constant c (1 means none).
    """

    _compiled: Callable[..., torch.Tensor] | None  # set with object.__setattr__: not a submodule
    #: set by flowspec.parallel.shard (FSDP2): the own shapes of the 0-d parameters it holds as (1,)
    fsdp_shapes: dict[str, torch.Size] | None = None

    def __init__(self, net: nn.Module, scale: float = 1.0, log_weight: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.scale = float(scale)
        #: optional learned log-variance loss weight w_{s,t} (flowspec.weighting); not part of X
        self.log_weight = log_weight
        # a torch.compile'd view of net for plain forward passes (not a submodule: the state dict
        # and the EMA copy stay those of net); jvps use net itself (see compile_network)
        object.__setattr__(self, "_compiled", None)

    def compile_network(self, **options) -> None:
        """Run plain forward passes through ``torch.compile(net, **options)``. Forward-mode jvps
        (flowspec.jvp) keep using the eager network: compiled graphs are traced for plain
        evaluation, and the jvp also needs autocast off and attention written out (flowspec.jvp.attention)."""
        object.__setattr__(self, "_compiled", torch.compile(self.net, **options))

    def __deepcopy__(self, memo):
        """A deep copy without the compiled view (the EMA copy runs eagerly unless compiled itself)."""
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, None if k == "_compiled" else copy.deepcopy(v, memo))
        return new

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """v_{s,t}(x), shape of x; s, t of shape (B,)."""
        c = self.scale
        # inside a compiled loss (flowspec.parallel.LossModule) the network is traced as part of it
        compiled = self._compiled
        net = self.net if compiled is None or torch.compiler.is_compiling() or jvp.active() else compiled
        if c == 1.0:
            return net(x, s, t)
        return c * net(x / c, s, t)

    def forward(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """X_{s,t}(x) = x + (t - s) v_{s,t}(x), shape of x."""
        return x + expand_as(t - s, x) * self.v(s, t, x)

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The diagonal v_{t,t}(x): the flow-matching velocity the tangent condition identifies."""
        return self.v(t, t, x)

    @torch.no_grad()
    def sample(self, x0: torch.Tensor, steps: int | None = None,
               times: torch.Tensor | None = None) -> torch.Tensor:
        """Compose X over a time grid: x_{k+1} = X_{t_k, t_{k+1}}(x_k).

        Args:
            x0: base samples, shape (N, ...).
            steps: K, for the uniform grid 0 = t_0 < ... < t_K = 1.
            times: an explicit increasing grid (K + 1,) instead of ``steps``.
        Returns:
            samples at t_K, shape of x0.
        """
        if times is None:
            if steps is None or steps < 1:
                raise ValueError("sample needs steps >= 1 or an explicit time grid")
            times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        x = x0
        n = x0.shape[0]
        for a, b in zip(times[:-1].tolist(), times[1:].tolist()):
            s = torch.full((n,), a, device=x.device, dtype=x.dtype)
            t = torch.full((n,), b, device=x.device, dtype=x.dtype)
            x = self(s, t, x)
        return x
