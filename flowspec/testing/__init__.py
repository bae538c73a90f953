"""flowspec's property-testing kit, for flowspec itself and for plugin authors (docs/plugins.md).

* exact oracles (MATH.md, "Exact oracles for tests"): :class:`GaussianOracle` (exact velocity and
  flow map of a Gaussian target under any interpolant), :class:`ExactFlowMap`,
  :class:`PerturbedFlowMap` (the exact map moved along fixed directions by trainable weights);
* checks: :func:`check_objective`, :func:`check_interpolant`, :func:`check_flow_map`, and the
  lighter :func:`check_dataset` and :func:`check_metric`, each raising :class:`CheckFailed` with
  every failing property;
* hypothesis strategies in :mod:`flowspec.testing.strategies` (schedules, Gaussian targets,
  time pairs with the edges, batch shapes), imported lazily (hypothesis is a test dependency);
* a pytest plugin (:mod:`flowspec.testing.pytest_plugin`, entry point ``pytest11``) with fixtures.
"""

from flowspec.testing.checks import (CheckFailed, check_dataset, check_flow_map, check_interpolant,
                                     check_metric, check_objective, default_oracles, edge_times)
from flowspec.testing.oracles import ExactFlowMap, GaussianOracle, PerturbedFlowMap


def __getattr__(name: str):
    if name == "strategies":
        import importlib

        return importlib.import_module("flowspec.testing.strategies")
    raise AttributeError(f"module 'flowspec.testing' has no attribute {name!r}")


__all__ = ["CheckFailed", "ExactFlowMap", "GaussianOracle", "PerturbedFlowMap", "check_dataset", "check_flow_map",
           "check_interpolant", "check_metric", "check_objective", "default_oracles", "edge_times", "strategies"]
