"""The run folder's pictures (flowspec.plots): loss.png, nfe.png, 2-D histograms beside the exact or
the data's density, image grids; each a readable PNG, written atomically."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from flowspec import plots
from flowspec.data.toy2d import Checkerboard, Moons


def png_shape(path):
    return matplotlib.image.imread(path).shape


def test_loss_plot_draws_each_term(tmp_path):
    records = [{"step": k, "loss": 1.0 / k, "diagonal": 2.0 / k, "lr": 1e-3, "grad_norm": 3.0} for k in (2, 4, 6)]
    records.append({"step": 6, "eval": {"1": {"kl": 0.1}}})
    assert plots.loss_plot(records, tmp_path / "loss.png", "tiny")
    assert png_shape(tmp_path / "loss.png")[2] in (3, 4)
    # a term that is not positive gets a symmetric log axis instead of failing
    assert plots.loss_plot([{"step": 1, "loss": -0.5}, {"step": 2, "loss": 0.0}], tmp_path / "neg.png", "t")
    assert not plots.loss_plot([{"step": 6, "eval": {}}], tmp_path / "none.png", "t")
    assert not (tmp_path / "none.png").exists()


def test_nfe_plot_has_the_flow_map_and_the_ode_baselines(tmp_path):
    result = {"step": 6, "steps": {"1": {"kl": 0.5, "energy": 0.1, "nfe": 1, "seconds": 0.1},
                                   "4": {"kl": 0.2, "energy": 0.05, "nfe": 4, "seconds": 0.2}},
              "ode": {"dopri5 tol=1e-05": {"kl": 0.1, "energy": 0.01, "nfe": 86, "seconds": 1.0},
                      "euler K=16": {"error": "RuntimeError: underflow in dt", "seconds": 0.1}}}
    assert plots.nfe_plot(result, tmp_path / "nfe.png", "tiny")
    h, w, _ = png_shape(tmp_path / "nfe.png")
    assert w > h  # two panels side by side
    assert not plots.nfe_plot({"steps": {"1": {"nfe": 1, "seconds": 0.1}}}, tmp_path / "none.png", "t")


@pytest.mark.parametrize("dataset, reference", [(Checkerboard(), "exact density"), (Moons(), "data")])
def test_density_plot_beside_the_exact_or_the_data_density(tmp_path, dataset, reference):
    x = dataset.sample(2000, torch.Generator().manual_seed(1)) + 0.1
    assert plots.density_plot(x, dataset, tmp_path / "d.png", "samples") == reference
    h, w, _ = png_shape(tmp_path / "d.png")
    assert w > 1.5 * h


def test_image_samples_become_a_grid(tmp_path):
    x = torch.rand(70, 1, 8, 8) * 2 - 1
    assert plots.density_plot(x, None, tmp_path / "g.png", "digits") == "grid"
    grid = plots.image_grid(x)
    assert grid.shape == (8 * 9 + 1, 8 * 9 + 1, 1) and 0 <= grid.min() and grid.max() <= 1
