"""Network and recipe options that express the paper's networks: time embeddings, the pair of times,
initialisation, depth, preconditioning, EMA schedules, learning-rate schedules (exact answers)."""

from __future__ import annotations

import math

import pytest
import torch

from flowspec import compile_spec
from flowspec.build import preconditioning
from flowspec.engine import EMA, lr_factor
from flowspec.networks.embeddings import FourierEmbedding, PositionalEmbedding
from flowspec.networks.mlp import MLP, MLPOptions
from flowspec.networks.unet import UNet, UNetOptions
from flowspec.spec import validate

TINY = {"data": {"kind": "checkerboard"}, "network": {"kind": "mlp", "width": 16, "depth": 2},
        "objective": {"characterization": "lagrangian"},
        "train": {"steps": 1, "batch_size": 8, "device": "cpu"}, "eval": {"num_samples": 16, "plot": False}}


def test_edm2_embedding_has_unit_mean_square_and_low_frequencies():
    emb = PositionalEmbedding(16, scale=1.0, magnitude_preserving=True)
    t = torch.rand(100, dtype=torch.float64)
    e = emb.double()(t)
    assert torch.allclose(e.pow(2).mean(1), torch.ones(100, dtype=torch.float64))  # 2 (sin^2 + cos^2) / 2
    assert float(emb.freqs.max()) == 1.0  # d/dt of every feature is at most sqrt(2)


def test_positional_scale_multiplies_the_time():
    a, b = PositionalEmbedding(8, scale=1000.0), PositionalEmbedding(8, scale=1.0)
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(a(t / 1000), b(t))


def test_fourier_features_are_fixed_by_the_seed_and_saved():
    a, b = FourierEmbedding(8, scale=2.0), FourierEmbedding(8, scale=2.0)
    assert torch.equal(a.freqs, b.freqs) and "freqs" in a.state_dict()
    t = torch.tensor([0.3])
    assert torch.allclose(a(t), torch.cat([torch.cos(a.freqs * 0.3), torch.sin(a.freqs * 0.3)])[None])


def test_mlp_depth_counts_hidden_layers_and_raw_times_feed_the_first_layer():
    net = MLP(MLPOptions(width=8, depth=5), (2,))
    linears = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6  # the reference's input layer + n_hidden = 4, then the output layer
    assert linears[0].in_features == 2 + 2  # x and the raw (s, t)


@pytest.mark.parametrize("times", ["s_t", "s_dt"])
def test_mlp_sees_the_chosen_pair_of_times(times):
    net = MLP(MLPOptions(width=8, depth=1, times=times), (2,))
    seen = []
    net.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, s, t = torch.zeros(1, 2), torch.tensor([0.25]), torch.tensor([0.75])
    net(x, s, t)
    assert seen[0][0, 2:].tolist() == [0.25, 0.75 if times == "s_t" else 0.5]


def test_lecun_normal_init_has_variance_one_over_fan_in_and_zero_biases():
    torch.manual_seed(0)
    net = MLP(MLPOptions(width=512, depth=2, init="lecun_normal"), (2,))
    hidden = net.layers[2]
    assert torch.all(hidden.bias == 0)
    assert abs(float(hidden.weight.detach().var()) * 512 - 1) < 0.02
    assert float(hidden.weight.detach().abs().max()) <= 2 / math.sqrt(512) / 0.87962566103423978 + 1e-6
    torch.manual_seed(0)
    default = MLP(MLPOptions(width=512, depth=2, init="torch"), (2,))
    assert not torch.all(default.layers[2].bias == 0)


def test_data_std_preconditioning_is_the_rms_of_the_data_std():
    spec = validate(TINY)
    graph = compile_spec(spec)
    board = 2 * 2 / math.sqrt(3)  # the [-4, 4]^2 board: std 2 scale / sqrt(3) in each coordinate
    assert spec.network.scale == "data_std"
    assert graph.model.scale == pytest.approx(board, rel=1e-6)
    assert preconditioning(0.5, graph.dataset) == 0.5
    x, s, t = torch.randn(3, 2), torch.rand(3), torch.rand(3)
    net = graph.model.net
    assert torch.allclose(graph.model(s, t, x), x + (t - s)[:, None] * board * net(x / board, s, t))


def test_unet_embedding_width_defaults_to_the_first_level():
    net = UNet(UNetOptions(channels=8, channel_mult=[1, 2], num_blocks=1, attention_resolutions=[],
                           channels_per_head=8), (1, 8, 8))
    assert net.embed_s.dim == 8 and tuple(net.emb_s.weight.shape) == (16, 8)  # (channels * max mult, dim)


def _iterates(n: int) -> list[torch.Tensor]:
    return [torch.tensor([float(k) ** 2, -float(k)]) for k in range(1, n + 1)]


def test_bias_corrected_ema_is_the_normalised_weighted_average():
    d, n = 0.9, 7
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, d, "bias_corrected")
    thetas = _iterates(n)
    for theta in thetas:
        model.weight.data.copy_(theta[None])
        ema.update(model)
    w = torch.tensor([d ** (n - j) for j in range(1, n + 1)], dtype=torch.float64)
    expected = (w[:, None] * torch.stack(thetas).double()).sum(0) / w.sum()
    assert torch.allclose(ema.model.weight.double()[0], expected, rtol=1e-6)


@pytest.mark.parametrize("schedule,first", [("plain", 0.1), ("warmup", 1 - 2 / 11)])
def test_plain_and_warmup_ema_weights(schedule, first):
    ema = EMA(torch.nn.Linear(1, 1), 0.9, schedule)
    assert ema.weight(1) == pytest.approx(first)
    assert ema.weight(10_000) == pytest.approx(0.1)


def test_reference_sqrt_schedule():
    o = validate({**TINY, "train": {**TINY["train"], "schedule": "sqrt", "decay_start": 100, "steps": 1000}}).train
    assert lr_factor(o, 49) == 1.0
    assert lr_factor(o, 399) == pytest.approx(1 / math.sqrt(4))


def test_a_run_folder_written_before_the_paper_defaults_keeps_its_network(tmp_path):
    from flowspec.spec import load_spec

    old = tmp_path / "run"
    old.mkdir()
    (old / "environment.json").write_text("{}")
    (old / "spec.toml").write_text('[data]\nkind = "checkerboard"\n[network]\nkind = "mlp"\n'
                                   'time_embedding = "positional"\n[objective]\ncharacterization = "lagrangian"\n')
    net = load_spec(old / "spec.toml").network
    assert (net.times, net.scale, net.init) == ("s_dt", 1.0, "torch")
    (tmp_path / "spec.toml").write_text((old / "spec.toml").read_text())  # a user's spec: today's defaults
    assert load_spec(tmp_path / "spec.toml").network.times == "s_t"
