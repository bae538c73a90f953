"""flowspec.testing: every built-in passes the kit's checks, and the checks catch wrong components.

The kit is what plugin authors rely on before spending GPU hours, so each check is tested both ways:
built-ins pass, and a deliberately wrong component (an objective whose minimizer is not the flow
map, a schedule with a wrong derivative, a map that is not the identity on the diagonal) fails with
a message naming the property.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.data.toy2d import Checkerboard
from flowspec.flowmap import FlowMap
from flowspec.interpolants import Linear, Trig
from flowspec.jvp import jvp
from flowspec.metrics import EnergyDistance, MetricUnavailable
from flowspec.networks.mlp import MLP, MLPOptions
from flowspec.objectives.base import OffDiagonal, Teacher
from flowspec.objectives.eulerian import Eulerian
from flowspec.objectives.flow_matching import FlowMatching
from flowspec.objectives.lagrangian import Lagrangian
from flowspec.objectives.progressive import Progressive
from flowspec.registry import Registry
from flowspec.testing import (
    CheckFailed,
    ExactFlowMap,
    GaussianOracle,
    PerturbedFlowMap,
    check_dataset,
    check_flow_map,
    check_interpolant,
    check_metric,
    check_objective,
)
from flowspec.testing import strategies as fst

F64 = torch.float64
FAST = settings(max_examples=10, deadline=None)
BUILTINS = Registry(builtins_only=True)


# -- every built-in passes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTINS.names("objectives"))
def test_builtin_objectives_pass_check_objective(name):
    cls = BUILTINS.get("objectives", name)
    # the anchored shortcut is biased by design at its finest level (tests/test_schemes.py)
    checked = check_objective(cls(cls.Options(anchor=False)) if name == "shortcut" else cls)
    # every declared target, 4 default oracles, float32 and float64; then (with off-diagonal samples)
    # one convergence line per target and the penalty line
    off = name != "flow_matching"
    assert len(checked) == len(cls.targets) * 4 * 2 + off * (len(cls.targets) + 1)
    if off:
        ratios = [float(line.rsplit("x ", 1)[1]) for line in checked if "Adam steps" in line]
        assert len(ratios) == len(cls.targets) and max(ratios) < 0.25


@pytest.mark.parametrize("options", [dict(stop_gradient="none", target="self"), dict(gamma="half")])
def test_builtin_objective_variants_pass(options):
    cls = Eulerian if "stop_gradient" in options else Progressive
    check_objective(cls(cls.Options(**options)), targets=[options.get("target", "self"), "teacher"])


@pytest.mark.parametrize("name", BUILTINS.names("interpolants"))
def test_builtin_interpolants_pass_check_interpolant(name):
    check_interpolant(BUILTINS.get("interpolants", name)())


@FAST
@given(fst.interpolants())
def test_strategy_schedules_are_valid_interpolants(interpolant):
    check_interpolant(interpolant)


@pytest.mark.parametrize("embedding", ["positional", "raw"])
def test_builtin_network_passes_check_flow_map(embedding):
    torch.manual_seed(0)
    net = MLP(MLPOptions(width=32, depth=2, time_embedding=embedding), (2,))
    assert check_flow_map(net, (2,)) == ["FlowMap(MLP): shapes, identity, tangent condition at s = t, jvp, "
                                         "gradients through the jvp"]


def test_mlp_on_image_shapes_passes_check_flow_map():
    torch.manual_seed(0)
    check_flow_map(MLP(MLPOptions(width=16, depth=1), (1, 2, 2)), (1, 2, 2))


@pytest.mark.parametrize("interp", [Linear, Trig])
def test_exact_flow_map_passes_with_its_velocity(interp):
    oracle = GaussianOracle(interp(), torch.tensor([0.8, -0.5], dtype=F64), 1.3, 0.7)
    check_flow_map(ExactFlowMap(oracle), velocity=oracle.velocity)
    check_flow_map(PerturbedFlowMap(oracle), velocity=oracle.velocity)


# -- the checks catch wrong components ---------------------------------------------------------------

class StartPointLagrangian(Lagrangian):
    """Wrong: the target velocity at the starting point, b_t(x), instead of at X_{s,t}(x)."""

    characterization = "start_point"

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),))
        return dX_dt - self.target_velocity(teacher, t, x)


class DoubledTarget(Lagrangian):
    """Wrong: a rescaled residual whose target is scaled too, dX/dt - 2 b_t(X)."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        s, t, x = sample.s, sample.t, sample.xs
        X, dX_dt = jvp(lambda tt: flow_map(s, tt, x), (t,), (torch.ones_like(t),))
        return dX_dt - 2 * self.target_velocity(teacher, t, X)


class NoGradient(Lagrangian):
    """Wrong: everything under stop-gradient, so training never moves the map."""

    def residual(self, flow_map: FlowMap, teacher: Teacher, sample: OffDiagonal) -> torch.Tensor:
        return super().residual(flow_map, teacher, sample).detach()


def test_start_point_lagrangian_is_caught():
    with pytest.raises(CheckFailed) as info:
        check_objective(StartPointLagrangian)
    msg = str(info.value)
    assert "StartPointLagrangian(target='self') Linear N([0.8, -0.5], 1.3^2), c=1 float64: off-diagonal residual " \
           "is not zero at the exact flow map: RMS" in msg
    assert "target='teacher'" in msg and "float32" in msg
    assert "the exact flow map is not a minimizer" in msg


def test_doubled_target_is_caught_in_every_case():
    with pytest.raises(CheckFailed) as info:
        check_objective(DoubledTarget)
    lines = str(info.value).splitlines()
    zero = [line for line in lines if "off-diagonal residual is not zero at the exact flow map" in line]
    assert len(zero) == 2 * 4 * 2  # 2 targets x 4 oracles x 2 dtypes


def test_detached_residual_is_caught():
    with pytest.raises(CheckFailed, match="gradient vanishes at a perturbed map"):
        check_objective(NoGradient, targets=["self"], dtypes=[F64])


def test_meanflow_without_stop_gradient_is_caught():
    """Eulerian + conditional target with stop_gradient = none: E|r|^2 = |E r|^2 + Var(r | I_s), and
    the variance term depends on grad_x X, so the exact map is not its minimizer; the antithetic
    expected-gradient check sees it. The paper's default (full stop-gradient) passes."""
    check_objective(Eulerian(Eulerian.Options(stop_gradient="full")), targets=["conditional"])
    with pytest.raises(CheckFailed, match=r"expected gradient \(antithetic pairs\) is not zero"):
        check_objective(Eulerian(Eulerian.Options(stop_gradient="none")), targets=["conditional"], dtypes=[F64])


def test_check_objective_rejects_undeclared_targets():
    with pytest.raises(ValueError, match="does not declare targets"):
        check_objective(Lagrangian, targets=["conditional"])


def test_flow_matching_only_checks_the_diagonal():
    assert len(check_objective(FlowMatching, dtypes=[F64])) == 4


def test_wrong_interpolant_is_caught():
    class Off(Linear):
        def coefficients(self, t):
            return dataclasses.replace(super().coefficients(t), beta_dot=1.01 * torch.ones_like(t))

    class NotData(Trig):
        def coefficients(self, t):
            c = super().coefficients(t)
            return dataclasses.replace(c, beta=0.9 * c.beta, beta_dot=0.9 * c.beta_dot)

    with pytest.raises(CheckFailed, match="Off: beta_dot disagrees with central differences"):
        check_interpolant(Off())
    with pytest.raises(CheckFailed, match=r"NotData: beta_0, beta_1 = 0.0, 0.9"):
        check_interpolant(NotData())


def test_wrong_flow_maps_are_caught():
    class Drift(FlowMap):
        """X = x + (t - s) v + 1e-3 sin(t): not the identity at s = t."""

        def forward(self, s, t, x):
            return super().forward(s, t, x) + 1e-3 * torch.sin(t)[:, None]

    torch.manual_seed(0)
    with pytest.raises(CheckFailed) as info:
        check_flow_map(Drift(MLP(MLPOptions(width=8, depth=1), (2,))))
    msg = str(info.value)
    assert "Drift: X_{t,t}(x) != x" in msg and "Drift: tangent condition" in msg
    oracle = GaussianOracle(Linear(), 0.5, 1.3)
    with pytest.raises(CheckFailed, match="differs from the given velocity"):
        check_flow_map(ExactFlowMap(oracle, diagonal_eps=0.1), (3,), velocity=oracle.velocity)


# -- oracles and strategies --------------------------------------------------------------------------

def test_perturbed_flow_map_is_exact_at_zero_and_moves_along_its_directions():
    oracle = GaussianOracle(Trig(), torch.tensor([0.8, -0.5], dtype=F64), 1.3, 0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    s, t = torch.tensor([0.0, 0.2, 0.5, 0.1, 1.0], dtype=F64), torch.tensor([0.0, 0.7, 1.0, 0.1, 1.0], dtype=F64)
    fm = PerturbedFlowMap(oracle)
    torch.testing.assert_close(fm(s, t, x), oracle.flow(s, t, x), atol=1e-14, rtol=0)
    moved = PerturbedFlowMap(oracle, [0.0, 0.5, 0.0, 0.0, 2.0])
    want = oracle.v(s, t, x) + 0.5 * (t - s)[:, None] * x + 2.0
    torch.testing.assert_close(moved.v(s, t, x), want, atol=1e-14, rtol=0)


def test_conditional_mean_is_exact():
    oracle = GaussianOracle(Trig(), torch.tensor([0.8, -0.5], dtype=F64), 1.3, 0.7)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    x = torch.tensor([[0.1, 0.2], [1.0, -1.0], [2.0, 0.5]], dtype=F64)
    m0, m1 = oracle.conditional_mean(t, x)
    it, dit = oracle.interpolant.interpolate(t, m0, m1)
    torch.testing.assert_close(it, x, atol=1e-14, rtol=0)  # the mean lies on {I_t = x}
    torch.testing.assert_close(dit, oracle.velocity(t, x), atol=1e-14, rtol=0)  # E[dI_t | I_t] = b_t
    # at t = 0, I_0 = x0: E[x0 | I_0 = x] = x, and x1 is independent of it, E[x1 | I_0 = x] = mu
    torch.testing.assert_close(m0[0], x[0], atol=1e-14, rtol=0)
    torch.testing.assert_close(m1[0], oracle.mu, atol=1e-14, rtol=0)
    torch.testing.assert_close(m1[2], x[2], atol=1e-14, rtol=0)  # at t = 1, I_1 = x1


@FAST
@given(fst.time_pairs(max_size=12))
def test_time_pairs_are_ordered_in_the_unit_interval(pair):
    s, t = pair
    assert s.dtype == t.dtype == F64 and s.shape == t.shape and s.dim() == 1
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()


def test_time_pairs_reach_every_edge():
    seen = set()

    @settings(max_examples=60, deadline=None)
    @given(fst.time_pair())
    def collect(pair):
        s, t = pair
        seen.update({"diagonal"} if s == t else set())
        seen.update({"s=0"} if s == 0 else set())
        seen.update({"t=1"} if t == 1 else set())

    collect()
    assert seen == {"diagonal", "s=0", "t=1"}


@FAST
@given(fst.batch_shapes(), fst.gaussian_targets())
def test_batch_shapes_and_targets(shape, target):
    assert 1 <= shape[0] <= 8 and len(shape) >= 2
    assert 0.3 <= target.sigma <= 2 and 0.5 <= target.c <= 1.5 and 1 <= len(target.mu) <= 3
    oracle = target.oracle(Linear())
    assert oracle.sample_data(4).shape == (4, len(target.mu))


# slow (six drawn oracles, ~10 s): the default tier keeps every built-in on the four default
# oracles (test_builtin_objectives_pass_check_objective) and on drawn correlated targets (test_kit_targets.py)
@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(fst.gaussian_oracles(), st.sampled_from(["lagrangian", "eulerian", "progressive"]))
def test_builtin_objectives_pass_on_drawn_oracles(oracle, name):
    check_objective(BUILTINS.get("objectives", name), oracles=[oracle], dtypes=[F64], n=32)


def test_pytest_plugin_fixtures(gaussian_oracle, exact_flow_map, flowspec_oracles):
    assert isinstance(exact_flow_map, PerturbedFlowMap) and exact_flow_map.oracle is gaussian_oracle
    assert gaussian_oracle.sigma == 1.3 and gaussian_oracle.c == 0.7 and len(flowspec_oracles) == 4
    check_objective(Lagrangian, oracles=[gaussian_oracle], dtypes=[F64])


# -- datasets and metrics ----------------------------------------------------------------------------

def _image_files(name: str, root) -> None:
    """Two 8 x 8 images A and 255 - A in the dataset's file format under root (every pixel then
    has the same two-point law, so a sample std is as accurate as one Bernoulli estimate)."""
    import gzip
    import struct

    import numpy as np

    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8)).astype(np.uint8)
    pair = np.stack([a, 255 - a])
    if name == "mnist":
        body = pair[:, 0]
        header = bytes([0, 0, 8, 3]) + struct.pack(">3I", *body.shape)
        gzip.open(root / "train-images-idx3-ubyte.gz", "wb").write(header + body.tobytes())
    elif name == "cifar10":  # 32 x 32 records: the 8 x 8 pattern tiled
        tiled = np.tile(pair, (1, 1, 4, 4))
        for i in range(1, 6):
            np.concatenate([np.zeros((2, 1), np.uint8), tiled.reshape(2, -1)], 1).tofile(root / f"data_batch_{i}.bin")
    elif name == "image_folder":
        from PIL import Image

        for k, img in enumerate(pair):
            Image.fromarray(img.transpose(1, 2, 0)).save(root / f"{k}.png")


@pytest.mark.parametrize("name", BUILTINS.names("datasets"))
def test_builtin_datasets_pass_check_dataset(name, tmp_path):
    cls = BUILTINS.get("datasets", name)
    if "root" in cls.Options.model_fields:  # file formats: two tiny images written for the test
        _image_files(name, tmp_path)
        dataset = cls(cls.Options(root=str(tmp_path)))
        assert dataset.images.shape[0] == 2 * (5 if name == "cifar10" else 1)
        check_dataset(dataset, n=4000)
    else:
        check_dataset(cls(), n=20_000 if name == "digits" else 100_000)


@pytest.mark.parametrize("name", BUILTINS.names("metrics"))
@pytest.mark.parametrize("data", ["checkerboard", "moons", "digits"])
def test_builtin_metrics_pass_check_metric(name, data):
    metric, dataset = BUILTINS.get("metrics", name)(), BUILTINS.get("datasets", data)()
    unavailable = (name == "fid"  # without the Inception weights
                   or (name == "kl" and data != "checkerboard") or (name == "digits_fd" and data != "digits"))
    if unavailable:
        with pytest.raises(MetricUnavailable):
            check_metric(metric, dataset)
    else:
        check_metric(metric, dataset)


def test_wrong_dataset_and_metric_are_caught():
    class WrongStd(Checkerboard):
        def std(self):
            return super().std() * 1.2

    class Backwards(EnergyDistance):
        lower_is_better = False

    with pytest.raises(CheckFailed, match=r"WrongStd: std\(\) = "):
        check_dataset(WrongStd())
    with pytest.raises(CheckFailed, match="does not prefer data"):
        check_metric(Backwards(), Checkerboard())


def test_pytest_plugin_is_registered_through_pytest11():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.dist is not None and e.dist.name == "flowspec"]
    assert (ep.name, ep.value) == ("flowspec", "flowspec.testing.pytest_plugin")
