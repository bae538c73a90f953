"""Fréchet distances: the formula against exact answers, the digits classifier metric, FID's network
and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from flowspec.features import digits_classifier, frechet_distance, statistics
from flowspec.metrics import FID, DigitsFrechet, MetricUnavailable


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_exact_answers():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    # diagonal covariances: |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    exact = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(exact, rel=1e-10)
    # S1 = a I, S2 any SPD (non-diagonal): tr((a S2)^(1/2)) = sqrt(a) tr(S2^(1/2))
    s2 = _spd(5, g)
    ev = torch.linalg.eigvalsh(s2)
    exact = float((mu1 - mu2).pow(2).sum() + 5 * 2.0 + ev.sum() - 2 * math.sqrt(2.0) * ev.sqrt().sum())
    assert frechet_distance(mu1, 2.0 * torch.eye(5, dtype=torch.float64), mu2, s2) == pytest.approx(exact, rel=1e-9)
    # general position: symmetric in its arguments, zero at equality, and the 1-D formula
    s1 = _spd(5, g)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    one = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert one == pytest.approx(4 + (2 - 3) ** 2)


def test_statistics_unbiased():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, cov = statistics(x)
    assert torch.allclose(mu, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.tensor([[4.0, 3.0], [3.0, 3.0]], dtype=torch.float64))


def test_digits_frechet_is_zero_on_the_data_and_large_on_noise():
    from flowspec.data.images import Digits

    model, accuracy = digits_classifier()
    assert accuracy > 0.98
    data = Digits()
    g = torch.Generator().manual_seed(0)
    metric = DigitsFrechet()
    assert abs(metric(data.all(), data, g)) < 1e-8
    noise = torch.rand(2000, 1, 8, 8, generator=g) * 2 - 1
    resampled = data.sample(2000, g)
    assert metric(noise, data, g) > 10 * metric(resampled, data, g) > 0


def test_digits_frechet_needs_digits():
    from flowspec.data.toy2d import Checkerboard

    with pytest.raises(MetricUnavailable, match="digits_fd needs 8 x 8"):
        DigitsFrechet()(torch.zeros(4, 2), Checkerboard(), torch.Generator())


def test_inception_weights_load_by_standard_names(tmp_path):
    from safetensors.torch import save_file

    from flowspec.inception import InceptionV3Features, load_inception

    net = InceptionV3Features()
    state = net.state_dict()
    for name, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
                        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
                        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
                        "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
                        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1)}.items():
        assert tuple(state[name].shape) == shape
    tensors = {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    tensors["fc.weight"], tensors["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = load_inception(tmp_path / "w.safetensors")
    out = loaded(torch.zeros(1, 3, 8, 8))
    assert out.shape == (1, 2048) and torch.isfinite(out).all() and (out >= 0).all()  # ReLU then mean
    (tmp_path / "w.pth").write_bytes(b"\x80\x02}q\x00.")  # a pickle: refused, with the conversion
    with pytest.raises(ValueError, match=r"w.pth: not a safetensors file \(convert the .pth once to safetensors "
                                         r"with the command in docs/images-and-gpus.md"):
        load_inception(tmp_path / "w.pth")
    del tensors["Mixed_6e.branch1x1.conv.weight"]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="Mixed_6e.branch1x1.conv.weight"):
        load_inception(tmp_path / "bad.safetensors")


def test_fid_without_weights_is_a_one_line_error(tmp_path):
    from flowspec.compile import compile_spec
    from flowspec.errors import UserError
    from flowspec.spec import validate

    base = {"data": {"kind": "digits"}, "objective": {"characterization": "lagrangian"},
            "network": {"kind": "unet", "channels": 8, "channel_mult": [1], "num_blocks": 1},
            "eval": {"metrics": ["fid"]}}
    with pytest.raises(UserError,
                       match=r"eval.metrics: fid needs the Inception weights: .*eval.metric_options.fid.weights"):
        compile_spec(validate(base))
    missing = tmp_path / "nope.pth"
    base["eval"]["metric_options"] = {"fid": {"weights": str(missing)}}
    with pytest.raises(UserError, match=rf"fid.weights: {missing}: no such file"):
        compile_spec(validate(base))
    base["eval"]["metric_options"] = {"fid": {"weigths": "x"}}
    with pytest.raises(UserError, match=r"eval.metric_options.fid.weigths: .*valid keys: weights"):
        compile_spec(validate(base))
    with pytest.raises(MetricUnavailable, match="fid needs images"):
        FID(FID.Options(weights="x")).check(type("D", (), {"shape": (2,)})())
