"""pytest plugin of flowspec's testing kit, registered through the ``pytest11`` entry point.

Installed with flowspec, it gives every test session these fixtures (nothing heavy is imported
until a fixture is used):

* ``gaussian_oracle``: :class:`~flowspec.testing.GaussianOracle` for the linear interpolant,
  x1 ~ N((0.8, -0.5), 1.3^2 I), x0 ~ N(0, 0.7^2 I);
* ``exact_flow_map``: its exact flow map as a :class:`~flowspec.testing.PerturbedFlowMap` (w = 0);
* ``flowspec_oracles``: :func:`~flowspec.testing.default_oracles` (linear and trig schedules, two
  targets), what :func:`~flowspec.testing.check_objective` uses by default.

and registers the hypothesis settings profile ``flowspec`` when the plugin is imported (before
hypothesis reads ``--hypothesis-profile``): max_examples = 15, no deadline, and no shrinking phase,
so that a failing check reports its first failing example at once (a check takes a second or two, and
hypothesis would otherwise spend up to 5 minutes shrinking it). Use it as
``pytest --hypothesis-profile=flowspec`` or ``@settings(settings.get_profile("flowspec"))``; an
explicit ``@settings(max_examples=...)`` keeps the loaded profile's other settings.
A plugin author's test is then::

    from flowspec.testing import check_objective

    def test_my_objective():
        check_objective(MyObjective)
"""

from __future__ import annotations

import pytest

#: the ``flowspec`` profile, with every phase but shrinking
PROFILE = dict(max_examples=15, deadline=None)


def register_profile() -> None:
    """Register the ``flowspec`` hypothesis profile (a no-op without hypothesis)."""
    try:
        from hypothesis import Phase, settings
    except ImportError:  # pragma: no cover - hypothesis is in flowspec's test extra
        return
    phases = tuple(p for p in Phase if p.name != "shrink")
    settings.register_profile("flowspec", phases=phases, max_examples=PROFILE["max_examples"],
                              deadline=PROFILE["deadline"])


register_profile()


@pytest.fixture
def gaussian_oracle():
    """GaussianOracle(Linear(), mu = (0.8, -0.5), sigma = 1.3, c = 0.7), float64."""
    import torch

    from flowspec.interpolants import Linear
    from flowspec.testing.oracles import GaussianOracle

    return GaussianOracle(Linear(), torch.tensor([0.8, -0.5], dtype=torch.float64), sigma=1.3, c=0.7)


@pytest.fixture
def exact_flow_map(gaussian_oracle):
    """The exact flow map of ``gaussian_oracle`` (PerturbedFlowMap with weights 0)."""
    from flowspec.testing.oracles import PerturbedFlowMap

    return PerturbedFlowMap(gaussian_oracle)


@pytest.fixture
def flowspec_oracles():
    """The oracles check_objective uses by default."""
    from flowspec.testing.checks import default_oracles

    return default_oracles()
