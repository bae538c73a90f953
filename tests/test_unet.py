"""The EDM2-style U-Net: the flow-map contract (testing kit), magnitude preservation, preconditioning."""

from __future__ import annotations

import math

import pytest
import torch

from flowspec.errors import UserError
from flowspec.flowmap import FlowMap
from flowspec.networks.unet import MPConv, UNet, mp_cat, mp_silu, mp_sum
from flowspec.testing import checks

TINY = dict(channels=8, channel_mult=[1, 2], num_blocks=1, attention_resolutions=[4],
            channels_per_head=4, embedding_dim=8)


def tiny_unet(shape=(1, 8, 8), **kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNet.Options(**{**TINY, **kw}), shape)
    with torch.no_grad():  # leave the zero-initialized gains so the check sees a non-trivial map
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if hasattr(m, "emb_gain"):
                m.emb_gain.fill_(0.5)
    return net


def test_unet_satisfies_the_flow_map_contract():
    net = tiny_unet()
    assert net.dec[0].heads > 0  # attention is exercised (the lowest level always has it)
    checks.check_flow_map(FlowMap(net, scale=net.options.scale), (1, 8, 8), n=4)


def test_unet_rgb_non_square():
    net = tiny_unet((3, 4, 8), channel_mult=[1, 1, 2], attention_resolutions=[2])
    checks.check_flow_map(FlowMap(net, scale=net.options.scale), (3, 4, 8), n=3)


def test_identity_at_initialization_and_preconditioning():
    torch.manual_seed(0)
    net = UNet(UNet.Options(**TINY), (1, 8, 8))
    x, s, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 0.2, 0.5]), torch.tensor([1.0, 0.7, 0.5])
    assert torch.equal(FlowMap(net, scale=0.5)(s, t, x), x)  # out_gain = 0: v = 0
    net = tiny_unet()
    fm = FlowMap(net, scale=0.5)
    with torch.no_grad():
        expected = x + (t - s)[:, None, None, None] * 0.5 * net(x / 0.5, s, t)
        assert torch.allclose(fm(s, t, x), expected, atol=1e-6)


def test_magnitude_preserving_layers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    y = MPConv(64, 32)(x)  # unit-norm rows / sqrt(fan_in): E[y^2] = E[x^2] for white input
    assert abs(y.pow(2).mean().item() - 1) < 0.05
    assert abs(mp_silu(x).pow(2).mean().item() - 1) < 0.02
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert abs(mp_sum(a, b, 0.3).pow(2).mean().item() - 1) < 0.02
    # mp_cat's weights, exactly: c (1 - u) / sqrt(Na) and c u / sqrt(Nb)
    ones_a, ones_b = torch.ones(1, 2), torch.ones(1, 6)
    c = math.sqrt(8 / (0.7 ** 2 + 0.3 ** 2))
    out = mp_cat(ones_a, ones_b, 0.3)
    assert torch.allclose(out[0, :2], torch.full((2,), c * 0.7 / math.sqrt(2)))
    assert torch.allclose(out[0, 2:], torch.full((6,), c * 0.3 / math.sqrt(6)))


def test_unet_errors_are_one_line():
    with pytest.raises(UserError, match=r"network.kind: .*\(C, H, W\)"):
        UNet(UNet.Options(**TINY), (2,))
    with pytest.raises(UserError, match=r"network.channel_mult: .*divisible by 4"):
        UNet(UNet.Options(**{**TINY, "channel_mult": [1, 1, 1]}), (1, 6, 6))
