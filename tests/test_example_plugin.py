"""The example plugin (plugins/flowspec-huber) and its spec, found through entry points.

The plugin's source folder goes on sys.path with a dist-info equivalent to its pyproject's entry
points, so this runs whether or not the plugin is pip-installed (CI also installs it and runs its
own tests and the spec).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowspec import engine
from flowspec.compile import compile_spec
from flowspec.registry import Registry
from flowspec.spec import load_spec, to_toml, tomllib
from tests.test_registry import make_dist

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "flowspec-huber"


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Registry:
    meta = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    make_dist(tmp_path, meta["name"], meta["version"], meta["entry-points"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    return Registry(builtins_only=False)


def test_plugin_components_register(registry):
    for group, name in (("objectives", "lagrangian_huber"), ("interpolants", "power"), ("metrics", "moments")):
        comp = registry.components(group)[name]
        assert comp.error is None and comp.distribution == "flowspec-huber", comp.error


def test_plugin_spec_validates_compiles_and_steps(registry):
    spec = load_spec(ROOT / "specs" / "checkerboard-huber.toml",
                     ["network.width=16", "network.depth=1", "train.batch_size=64", "train.device=cpu"], registry)
    assert spec.objective.characterization == "lagrangian_huber" and spec.objective.huber_c == 0.03
    assert spec.interpolant.kind == "power" and spec.interpolant.exponent == 2.0
    assert "moments" in spec.eval.metrics and 'characterization = "lagrangian_huber"' in to_toml(spec)
    graph = compile_spec(spec, registry)
    assert type(graph.objective).__name__ == "HuberLagrangian" and type(graph.interpolant).__name__ == "Power"
    losses = [engine.step(graph).loss.item() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    x = graph.sampler().sample(torch.randn(500, 2), steps=2)
    value = graph.metrics["moments"](x, graph.dataset, torch.Generator().manual_seed(0))
    assert value > 0


def test_plugin_options_are_validated(registry, tmp_path):
    from flowspec.errors import UserError

    with pytest.raises(UserError) as info:
        load_spec(ROOT / "specs" / "checkerboard-huber.toml", ["objective.huber_c=0", "interpolant.exponent=0.5"],
                  registry)
    lines = [line.split(": ", 1)[1] for line in info.value.lines]
    assert sorted(lines) == ["interpolant.exponent: must be greater than or equal to 1 (got 0.5)",
                             "objective.huber_c: must be greater than 0 (got 0)"]
