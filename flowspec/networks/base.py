"""The Network base class: a module ``net(x, s, t) -> v`` shaped like x, wrapped by FlowMap."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class NetworkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Network(nn.Module):
    """Base class. Constructed as ``Network(options, shape)`` with shape the per-sample data shape.

    ``forward(x, s, t)`` takes x of shape (B, *shape) and times s, t of shape (B,) and returns v of
    shape (B, *shape). The paper's networks condition on s and t - s.
    """

    Options: ClassVar[type[NetworkOptions]] = NetworkOptions

    def __init__(self, options: NetworkOptions, shape: tuple[int, ...]):
        super().__init__()
        self.options = options
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
