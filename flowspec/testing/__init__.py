"""Test helpers for flowspec and its plugins: exact oracles (MATH.md, "Exact oracles for tests")."""

from flowspec.testing.oracles import ExactFlowMap, GaussianOracle

__all__ = ["ExactFlowMap", "GaussianOracle"]
