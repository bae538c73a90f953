"""Multilayer perceptron flow-map network for vector data: the self-distillation paper's 2-D network.

v(x, s, t) = W_out h_depth,  h_k = act(W_k h_{k-1} + b_k),  h_0 = [x, emb(s), emb(t or t - s)].

``depth`` counts the hidden layers (each a Linear of ``width`` units and an activation). The paper's
"4 x 512" checkerboard network is, in its reference code, an input layer of 512 units followed by
``n_hidden = 4`` layers of 512 units, then a linear output: ``depth = 5`` here. Its time input is
raw (s, t) beside x / c, its preconditioning c is the data's scale (``rescale = sigma_data``), its
weights are LeCun-normal with zero biases (flax's ``Dense`` default) and its GELU is the tanh
approximation (``jax.nn.gelu``'s default). Those are this network's defaults; docs/results.md
measures what each one is worth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, PositiveFloat
from torch import nn

from flowspec.jvp import Linear
from flowspec.networks.base import Network, NetworkOptions
from flowspec.networks.embeddings import FourierEmbedding, PositionalEmbedding, RawTime

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "relu": nn.ReLU,
    "tanh": nn.Tanh}

#: std of a standard normal truncated to [-2, 2]: lecun_normal divides by it so the variance is 1 / fan_in
_TRUNC_STD = 0.87962566103423978


def lecun_normal_(layer: nn.Linear) -> None:
    """W ~ N(0, 1 / fan_in) truncated at two standard deviations, b = 0 (flax's default Dense init)."""
    std = math.sqrt(1.0 / layer.in_features) / _TRUNC_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLPOptions(NetworkOptions):
    width: int = Field(512, gt=0, description="hidden units per layer")
    depth: int = Field(5, gt=0, description="hidden layers, each Linear(width) + activation (the paper's "
                       "'4 x 512' is an input layer plus 4: depth = 5)")
    activation: Literal["gelu", "gelu_tanh", "silu", "relu", "tanh"] = Field(
        "gelu_tanh", description="gelu_tanh: GELU's tanh approximation (the reference code's); gelu: exact erf")
    time_embedding: Literal["raw", "positional", "fourier"] = Field(
        "raw", description="how the two times enter: raw values (the reference), sinusoids of "
        "embedding_scale * t, or random Fourier features of std fourier_scale")
    times: Literal["s_t", "s_dt"] = Field(
        "s_t", description="the pair of times the network sees: (s, t) as the reference MLP, or (s, t - s)")
    embedding_dim: int = Field(32, gt=0, multiple_of=2, description="features per time (positional, fourier)")
    embedding_scale: PositiveFloat = Field(
        1000.0, description="positional: the time multiplier (1000: the DDPM code; derivatives in t scale with it)")
    fourier_scale: PositiveFloat = Field(1.0, description="fourier: std of the random frequencies")
    init: Literal["lecun_normal", "torch"] = Field(
        "lecun_normal", description="lecun_normal: N(0, 1/fan_in) truncated, zero biases (flax's default, "
        "the reference's); torch: PyTorch's Linear default (uniform, kaiming a = sqrt(5))")
    scale: PositiveFloat | Literal["data_std"] = Field(
        "data_std", description='preconditioning c in X = x + (t - s) c net(x / c, s, t) ("data_std": the '
        "data's RMS std, the reference's rescale = sigma_data; 1: none)")


class MLP(Network):
    """v(x, s, t) = MLP([x, emb(s), emb(t) or emb(t - s)]): input (B, *shape), output (B, *shape)."""

    Options = MLPOptions
    options: MLPOptions

    def __init__(self, options: MLPOptions, shape: tuple[int, ...]):
        super().__init__(options, shape)
        o = options
        dim = math.prod(shape)
        self.embed_s, self.embed_t = self._embedding(o), self._embedding(o)
        layers: list[nn.Module] = []
        width_in = dim + 2 * self.embed_s.dim
        for _ in range(o.depth):
            layers += [Linear(width_in, o.width), ACTIVATIONS[o.activation]()]
            width_in = o.width
        layers.append(Linear(width_in, dim))
        self.layers = nn.Sequential(*layers)
        if o.init == "lecun_normal":
            for m in self.layers:
                if isinstance(m, nn.Linear):
                    lecun_normal_(m)

    @staticmethod
    def _embedding(o: MLPOptions) -> RawTime | PositionalEmbedding | FourierEmbedding:
        if o.time_embedding == "positional":
            return PositionalEmbedding(o.embedding_dim, scale=o.embedding_scale)
        if o.time_embedding == "fourier":
            return FourierEmbedding(o.embedding_dim, scale=o.fourier_scale)
        return RawTime()

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        second = t if self.options.times == "s_t" else t - s
        h = torch.cat([x.flatten(1), self.embed_s(s).to(x.dtype), self.embed_t(second).to(x.dtype)], dim=1)
        return self.layers(h).view_as(x)
