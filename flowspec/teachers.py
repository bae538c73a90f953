"""Distillation targets b-hat (MATH.md, "Losses"): anything with ``velocity(t, x)``.

A teacher also offers a map velocity ``v(s, t, x)`` for the progressive objectives: by default one
Euler step of its velocity, X_{s,t}(x) = x + (t - s) b_s(x), i.e. v_{s,t}(x) = b_s(x). Teachers are
always evaluated under stop-gradient.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Teacher(Protocol):
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """b-hat_t(x) for t of shape (B,) and x of shape (B, ...)."""

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map velocity v_{s,t}(x) of the teacher's flow map."""


class SelfTeacher:
    """Self-distillation: the model's own diagonal sg(v_{t,t}(x)) and its own map sg(v_{s,t}(x)).

    Args:
        flow_map: the model being trained (current parameters, the paper's default), or its EMA copy.
    """

    def __init__(self, flow_map: nn.Module):
        self.flow_map = flow_map

    @torch.no_grad()
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.flow_map.velocity(t, x)

    @torch.no_grad()
    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.flow_map.v(s, t, x)
