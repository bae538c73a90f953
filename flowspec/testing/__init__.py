"""flowspec's property-testing kit, for flowspec itself and for plugin authors (docs/plugins.md).

* exact oracles: :class:`GaussianOracle` (isotropic Gaussian target, any interpolant),
  :class:`CorrelatedGaussianOracle` (full covariance, anisotropic base: a flow map that mixes
  coordinates), :class:`MixtureOracle` (exact velocity, float64 ODE ground truth);
* flow maps built on them: :class:`ExactFlowMap`, :class:`PerturbedFlowMap` (fixed directions) and
  :class:`AffineFlowMap` (the exact map plus a trainable dense, time-dependent affine correction);
* checks: :func:`check_objective`, :func:`check_penalty`, :func:`check_interpolant`,
  :func:`check_flow_map`, and the lighter :func:`check_dataset` and :func:`check_metric`, each raising
  :class:`CheckFailed` with every failing property;
* hypothesis strategies in :mod:`flowspec.testing.strategies` (schedules, targets, time pairs with the
  edges, batch shapes), imported lazily (hypothesis is a test dependency);
* a pytest plugin (:mod:`flowspec.testing.pytest_plugin`, entry point ``pytest11``) with fixtures and
  the hypothesis profile ``flowspec``.
"""

from flowspec.testing.checks import (
    CheckFailed,
    check_dataset,
    check_flow_map,
    check_interpolant,
    check_metric,
    check_objective,
    check_penalty,
    default_oracles,
    edge_times,
)
from flowspec.testing.families import AffineFlowMap
from flowspec.testing.oracles import ExactFlowMap, GaussianOracle, PerturbedFlowMap
from flowspec.testing.targets import CorrelatedGaussianOracle, MixtureOracle, correlated_gaussian


def __getattr__(name: str):
    if name == "strategies":
        import importlib

        return importlib.import_module("flowspec.testing.strategies")
    raise AttributeError(f"module 'flowspec.testing' has no attribute {name!r}")


__all__ = ["AffineFlowMap", "CheckFailed", "CorrelatedGaussianOracle", "ExactFlowMap", "GaussianOracle",
           "MixtureOracle", "PerturbedFlowMap", "check_dataset", "check_flow_map", "check_interpolant",
           "check_metric", "check_objective", "check_penalty", "correlated_gaussian", "default_oracles",
           "edge_times", "strategies"]
