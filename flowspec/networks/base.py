"""The Network base class: a module ``net(x, s, t) -> v`` shaped like x, wrapped by FlowMap."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn


class NetworkOptions(BaseModel):
    """Options every network has. ``scale`` is the preconditioning c of the flow map
    X_{s,t}(x) = x + (t - s) c net(x / c, s, t): the network sees inputs and returns outputs of
    about unit size when c is the data's scale. "data_std" resolves (at compile time) to the root
    mean square of the data's per-dimension standard deviations."""

    model_config = ConfigDict(extra="forbid")
    scale: PositiveFloat | Literal["data_std"] = Field(
        1.0, description='preconditioning c in X = x + (t - s) c net(x / c, s, t); "data_std": the data\'s '
        'RMS standard deviation; 1: none')


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
