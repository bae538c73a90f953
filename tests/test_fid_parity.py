"""FID parity: flowspec's Inception-v3 and Fréchet distance against the standard implementation,
pytorch-fid's FID Inception graph (``pytorch_fid.inception.InceptionV3`` with ``use_fid_inception``),
built with the same random weights (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from flowspec.features import frechet_distance, statistics
from flowspec.inception import InceptionV3Features


def _pytorch_fid():
    """pytorch_fid.inception and pytorch_fid.fid_score, or skip. PyPI's torchvision wheel is built
    for a CUDA torch: with the CPU torch its compiled operators fail to register when the package
    initialises, so the pure-Python modules pytorch-fid needs (torchvision.models.inception) are
    imported without running torchvision/__init__.py."""
    if importlib.util.find_spec("pytorch_fid") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("pytorch-fid is not installed (pip install -e '.[test]')")
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except RuntimeError:
            sys.modules.pop("torchvision", None)
            for name in [n for n in sys.modules if n.startswith("torchvision.")]:
                sys.modules.pop(name)
            package = types.ModuleType("torchvision")
            root = Path(importlib.util.find_spec("torchvision").origin).parent
            package.__path__ = [str(root)]
            sys.modules["torchvision"] = package
            from torchvision.version import __version__

            package.__version__ = __version__
    import pytorch_fid.fid_score as fid_score
    import pytorch_fid.inception as inception

    return inception, fid_score


def _random_weights(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter and batch-norm statistic drawn at random, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, v in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = v.clone()
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(v.shape, generator=g)
        elif name.endswith("running_mean") or name.endswith("bn.bias"):
            state[name] = 0.1 * torch.randn(v.shape, generator=g)
        elif name.endswith("bn.weight"):
            state[name] = 0.5 + torch.rand(v.shape, generator=g)
        else:  # convolution weights, fan-in scaled
            fan_in = v[0].numel()
            state[name] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def both_networks():
    inception, fid_score = _pytorch_fid()
    ours = InceptionV3Features().eval()
    state = _random_weights(ours, seed=0)
    ours.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    head = {"fc.weight": 0.01 * torch.randn(1008, 2048, generator=g), "fc.bias": torch.zeros(1008)}
    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *a, **k: {**state, **head}  # the same weights, no download
    try:
        theirs = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                       normalize_input=False, use_fid_inception=True).eval()
    finally:
        inception.load_state_dict_from_url = original
    return ours, theirs, fid_score


def test_pool3_features_match_pytorch_fid(both_networks):
    ours, theirs, _ = both_networks
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # images in [-1, 1]
    with torch.no_grad():
        a = ours(x)
        b = theirs(x)[0].flatten(1)
    assert a.shape == b.shape == (3, 2048)
    assert a.abs().mean() > 1e-2  # the features are not trivially zero
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


# slow (scipy's 2048 x 2048 sqrtm, ~20 s): the default tier keeps the features' parity above and
# tests/test_features.py's exact Frechet distances
@pytest.mark.slow
def test_fid_of_random_image_sets_matches_pytorch_fid(both_networks):
    ours, theirs, fid_score = both_networks
    g = torch.Generator().manual_seed(3)
    sets = [torch.rand(12, 3, 16, 16, generator=g) * 2 - 1, (torch.rand(12, 3, 16, 16, generator=g) * 2 - 1) * 0.5]
    with torch.no_grad():
        feats_ours = [ours(x) for x in sets]
        feats_theirs = [theirs(x)[0].flatten(1).double().numpy() for x in sets]
    fid_ours = frechet_distance(*statistics(feats_ours[0]), *statistics(feats_ours[1]))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats_theirs]
    fid_theirs = float(fid_score.calculate_frechet_distance(*stats[0], *stats[1]))
    assert fid_theirs > 0
    assert abs(fid_ours - fid_theirs) <= 1e-4 * fid_theirs
