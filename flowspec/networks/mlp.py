"""Multilayer perceptron flow-map network for vector data (the paper's 2-D network: 4 x 512, GELU)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from flowspec.jvp import Linear
from flowspec.networks.base import Network, NetworkOptions
from flowspec.networks.embeddings import PositionalEmbedding, RawTime

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLPOptions(NetworkOptions):
    width: int = Field(512, gt=0, description="hidden units per layer")
    depth: int = Field(4, gt=0, description="number of hidden layers")
    activation: Literal["gelu", "silu", "relu", "tanh"] = "gelu"
    time_embedding: Literal["positional", "raw"] = Field(
        "positional", description="how s and t - s enter: sinusoidal embeddings or raw values"
    )
    embedding_dim: int = Field(32, gt=0, multiple_of=2, description="size of each time embedding")


class MLP(Network):
    """v(x, s, t) = MLP([x, emb(s), emb(t - s)]): input (B, *shape), output (B, *shape)."""

    Options = MLPOptions

    def __init__(self, options: MLPOptions, shape: tuple[int, ...]):
        super().__init__(options, shape)
        o = options
        dim = math.prod(shape)
        if o.time_embedding == "positional":
            self.embed_s, self.embed_dt = PositionalEmbedding(o.embedding_dim), PositionalEmbedding(o.embedding_dim)
            emb = 2 * o.embedding_dim
        else:
            self.embed_s, self.embed_dt = RawTime(), RawTime()
            emb = 2
        layers: list[nn.Module] = []
        width_in = dim + emb
        for _ in range(o.depth):
            layers += [Linear(width_in, o.width), ACTIVATIONS[o.activation]()]
            width_in = o.width
        layers.append(Linear(width_in, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), self.embed_s(s), self.embed_dt(t - s)], dim=1)
        return self.layers(h).view_as(x)
