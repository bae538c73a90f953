"""An EDM2-style U-Net flow-map network for images (docs/math.md, "Flow map and its parameterization").

v(x, s, t) = UNet(x, emb(s, t - s)) with x of shape (B, C, H, W), s and t of shape (B,). The FlowMap
wraps it with the image preconditioning X_{s,t}(x) = x + (t - s) c net(x / c, s, t) (the network's
``scale`` option is c; the paper uses c = 0.5 for data in [-1, 1]).

Every layer is magnitude preserving in the sense of EDM2 (Karras et al. 2024): for inputs with unit
second moment per element, outputs keep unit second moment at initialization and through training.

* MPConv: w_hat = w / |w| per output channel (normalized in the forward pass), then scaled by
  gain / sqrt(fan_in), so y = w_hat * x has the magnitude of x. (EDM2 also rewrites the stored
  weights to unit norm every step; we only normalize in the forward pass, which keeps the forward
  pass free of parameter writes, as forward-mode AD and data parallelism need.)
* mp_silu(x) = silu(x) / 0.596 (0.596 = sqrt(E[silu(z)^2]) for z ~ N(0, 1)).
* mp_sum(a, b, u) = ((1 - u) a + u b) / sqrt((1 - u)^2 + u^2).
* mp_cat(a, b, u): concatenation along channels with weights keeping the total magnitude.
* pixel_norm(x): x / rms over channels at each pixel.

Conditioning: emb = mp_silu(mp_sum(W_s pos(s), W_d pos(t - s))), pos a sinusoidal embedding of
flowspec.networks.embeddings; each residual block multiplies its features by (1 + W_e emb). The
default pos is EDM2's (and the reference flow-map U-Net's): magnitude-preserving sinusoids of t
itself, frequencies 10000^(-k / (dim/2)) <= 1, dim = channels * channel_mult[0]; the Lagrangian and
Eulerian objectives differentiate through it, and its derivative in t stays O(1). ``time_embedding =
"positional"`` is the DDPM code of 1000 t instead (derivatives up to 1000).
The output layer has a learned gain initialized to 0, so v = 0 and X = id at initialization.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import nn

from flowspec.errors import UserError
from flowspec.jvp import attention, conv2d, linear
from flowspec.networks.base import Network, NetworkOptions
from flowspec.networks.embeddings import PositionalEmbedding


def normalize(x: torch.Tensor, dim: tuple[int, ...] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / rms(x) over ``dim`` (default: all but the first), with rms = |x| / sqrt(numel over dim)."""
    if dim is None:
        dim = tuple(range(1, x.ndim))
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # the norm in >= float32
    norm = torch.linalg.vector_norm(wide, dim=dim, keepdim=True)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) / 0.596: unit second moment for standard normal input."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, u: float = 0.5) -> torch.Tensor:
    """((1 - u) a + u b) / sqrt((1 - u)^2 + u^2): magnitude-preserving blend of two tensors."""
    return a.lerp(b, u) / math.sqrt((1 - u) ** 2 + u ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, u: float = 0.5) -> torch.Tensor:
    """Concatenate (B, Na, ...) and (B, Nb, ...) along dim 1 with weights c (1 - u) / sqrt(Na) and
    c u / sqrt(Nb), c = sqrt((Na + Nb) / ((1 - u)^2 + u^2)): the result has the inputs' magnitude."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - u) ** 2 + u ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - u)), b * (c / math.sqrt(nb) * u)], dim=1)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel k > 0) or linear layer (k = 0) without bias.

    weight: (out, in, k, k) or (out, in); y = conv(x, gain * w_hat / sqrt(in k^2)), w_hat = w / rms(w)
    per output channel. Input (B, in, H, W) -> (B, out, H, W), or (B, in) -> (B, out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 0):
        super().__init__()
        shape = (out_channels, in_channels) + ((kernel, kernel) if kernel else ())
        self.weight = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w: torch.Tensor = self.weight
        w = normalize(w.float() if w.dtype in (torch.float16, torch.bfloat16) else w)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else w
        if w.ndim == 2:
            return linear(x, w)
        return conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Residual block: (B, c_in, H, W) -> (B, c_out, H', W') with H' = H / 2 ("down"), 2 H ("up") or H.

    enc: x = pixel_norm(skip(resample(x))); y = conv1(drop(mp_silu(conv0(mp_silu(x)) * (1 + W emb))));
    x = mp_sum(x, y, 0.3). dec: the same without the pixel norm, the skip 1x1 conv after the sum's
    input resampling. Optional self-attention: x = mp_sum(x, proj(attn(pixel_norm(q), pixel_norm(k), v)), 0.3).
    """

    def __init__(self, c_in: int, c_out: int, c_emb: int, flavor: str, resample: str = "keep",
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        self.flavor, self.resample, self.c_out = flavor, resample, c_out
        self.heads = max(1, c_out // channels_per_head) if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(c_out if flavor == "enc" else c_in, c_out, 3)
        self.emb_linear = MPConv(c_emb, c_out)
        self.conv_res1 = MPConv(c_out, c_out, 3)
        self.conv_skip = MPConv(c_in, c_out, 1) if c_in != c_out else None
        self.attn_qkv = MPConv(c_out, 3 * c_out, 1) if self.heads else None
        self.attn_proj = MPConv(c_out, c_out, 1) if self.heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.attn_qkv is not None and self.attn_proj is not None:  # self.heads > 0
            b, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.heads, ch // self.heads, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # each (B, heads, d, HW), unit rms over d
            y = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            y = self.attn_proj(y.transpose(-1, -2).reshape(b, ch, h, w))
            x = mp_sum(x, y, self.attn_balance)
        if self.clip_act:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class UNetOptions(NetworkOptions):
    channels: int = Field(128, gt=0, description="channels at the first resolution level")
    channel_mult: list[int] = Field([2, 2, 2], min_length=1,
                                    description="channel multiplier per resolution level (each level halves H and W)")
    num_blocks: int = Field(4, ge=1, description="residual blocks per level in the encoder (decoder: one more)")
    attention_resolutions: list[int] = Field([16], description="feature-map heights H with self-attention")
    channels_per_head: int = Field(64, gt=0, description="attention head size")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability in the residual blocks")
    time_embedding: Literal["edm2", "positional"] = Field(
        "edm2", description="edm2: magnitude-preserving sinusoids of t, frequencies <= 1 (EDM2, the reference "
        "U-Net); positional: sinusoids of 1000 t (the DDPM code)")
    embedding_dim: int | None = Field(
        None, gt=0, multiple_of=2, description="size of each time embedding (s and t - s); unset: "
        "channels * channel_mult[0], as EDM2")
    scale: PositiveFloat | Literal["data_std"] = Field(
        0.5, description="preconditioning c in X = x + (t - s) c net(x / c, s, t - s) (the paper: 0.5 for data "
        "in [-1, 1])")


class UNet(Network):
    """EDM2-style U-Net: (B, C, H, W) images and times s, t (B,) -> v (B, C, H, W), conditioned on
    s and t - s through positional embeddings (the module docstring gives the layers)."""

    Options = UNetOptions
    options: UNetOptions

    def __init__(self, options: UNetOptions, shape: tuple[int, ...]):
        super().__init__(options, shape)
        o = options
        if len(shape) != 3:
            raise UserError(f"network.kind: \"unet\" needs image data of shape (C, H, W); got shape {tuple(shape)} "
                            "(valid: an image dataset, or kind = \"mlp\")")
        c_img, h, w = shape
        factor = 2 ** (len(o.channel_mult) - 1)
        if h % factor or w % factor:
            raise UserError(f"network.channel_mult: {len(o.channel_mult)} levels halve {h} x {w} images "
                            f"{len(o.channel_mult) - 1} times; H and W must be divisible by {factor} "
                            "(valid: fewer levels)")
        c_emb = o.channels * max(o.channel_mult)
        dim = o.embedding_dim or o.channels * o.channel_mult[0]
        edm2 = o.time_embedding == "edm2"
        self.embed_s, self.embed_dt = (
            PositionalEmbedding(dim, scale=1.0 if edm2 else 1000.0, magnitude_preserving=edm2) for _ in range(2))
        self.emb_s, self.emb_dt = MPConv(dim, c_emb), MPConv(dim, c_emb)
        block = functools.partial(Block, c_emb=c_emb, channels_per_head=o.channels_per_head, dropout=o.dropout)
        attn = set(o.attention_resolutions)

        self.conv_in = MPConv(c_img + 1, o.channels * o.channel_mult[0], 3)
        self.enc = nn.ModuleList()
        skips: list[int] = [o.channels * o.channel_mult[0]]
        cout = skips[0]
        for level, mult in enumerate(o.channel_mult):
            res = h >> level
            if level > 0:
                self.enc.append(block(cout, cout, flavor="enc", resample="down"))
                skips.append(cout)
            for _ in range(o.num_blocks):
                cin, cout = cout, o.channels * mult
                self.enc.append(block(cin, cout, flavor="enc", attention=res in attn))
                skips.append(cout)
        self.dec = nn.ModuleList()
        self.dec_concat: list[bool] = []
        for level in reversed(range(len(o.channel_mult))):
            res, mult = h >> level, o.channel_mult[level]
            if level == len(o.channel_mult) - 1:
                self.dec.append(block(cout, cout, flavor="dec", attention=True))
                self.dec.append(block(cout, cout, flavor="dec"))
                self.dec_concat += [False, False]
            else:
                self.dec.append(block(cout, cout, flavor="dec", resample="up"))
                self.dec_concat.append(False)
            for _ in range(o.num_blocks + 1):
                cin, cout = cout + skips.pop(), o.channels * mult
                self.dec.append(block(cin, cout, flavor="dec", attention=res in attn))
                self.dec_concat.append(True)
        self.conv_out = MPConv(cout, c_img, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (train.parallel = "fsdp"; flowspec.parallel): the
        blocks. The rest (embeddings, first and last convolutions) is sharded with the network."""
        return [*self.enc, *self.dec]

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, s, t): x (B, C, H, W), s and t (B,) -> (B, C, H, W)."""
        emb = mp_silu(mp_sum(self.emb_s(self.embed_s(s).to(x.dtype)), self.emb_dt(self.embed_dt(t - s).to(x.dtype))))
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        h = self.conv_in(h)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk, concat in zip(self.dec, self.dec_concat):
            if concat:
                h = mp_cat(h, skips.pop(), u=0.5)
            h = blk(h, emb)
        return self.conv_out(h, gain=self.out_gain).to(x.dtype)
