"""Plugin discovery (issue 4, item 1) against throwaway distributions put on sys.path.

Each test writes real ``*.dist-info`` folders (METADATA + entry_points.txt) and the modules they
point to into a temporary directory, so importlib.metadata finds them exactly as it finds an
installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowspec.errors import UserError
from flowspec.registry import Registry
from flowspec.spec import validate

GOOD = '''
from flowspec.objectives.lagrangian import Lagrangian
from flowspec.interpolants import Linear


class Scaled(Lagrangian):
    """A plugin objective."""
    characterization = "scaled"


class Straight(Linear):
    """A plugin interpolant."""
'''

SPEC = {"data": {"kind": "moons"}, "objective": {"characterization": "lagrangian"}}


def make_dist(root: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str] | None = None) -> None:
    """Write a distribution ``name`` (dist-info + modules) under ``root``."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    text = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                   for group, eps in entry_points.items())
    info.joinpath("entry_points.txt").write_text(text)
    for module, source in (modules or {}).items():
        root.joinpath(f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path holding: good-plugin (an objective and an interpolant),
    broken-plugin (an objective whose module raises on import), and two distributions that both
    register the interpolant 'twin'."""
    root = tmp_path / "site"
    root.mkdir()
    make_dist(root, "good-plugin", "1.2.0",
              {"flowspec.objectives": {"scaled": "good_mod:Scaled"},
               "flowspec.interpolants": {"straight": "good_mod:Straight", "twin": "good_mod:Straight"}},
              {"good_mod": GOOD})
    make_dist(root, "broken-plugin", "0.3", {"flowspec.objectives": {"broken": "broken_mod:Broken"}},
              {"broken_mod": "raise RuntimeError('boom: missing CUDA kernel')\n"})
    make_dist(root, "other-plugin", "2.0", {"flowspec.interpolants": {"twin": "good_mod:Straight"}})
    monkeypatch.syspath_prepend(str(root))
    return root


def test_plugins_are_discovered_with_distribution_and_version(site):
    reg = Registry(builtins_only=False)
    comp = reg.components("objectives")["scaled"]
    assert (comp.distribution, comp.version, comp.error) == ("good-plugin", "1.2.0", None)
    assert comp.obj.__name__ == "Scaled" and comp.target == "good_mod:Scaled"
    assert reg.components("objectives")["lagrangian"].distribution == "flowspec"
    assert "scaled" in reg.names("objectives") and "straight" in reg.names("interpolants")


def test_a_failing_plugin_is_recorded_and_breaks_nothing_else(site):
    reg = Registry(builtins_only=False)
    broken = reg.components("objectives")["broken"]
    assert broken.obj is None and broken.distribution == "broken-plugin"
    assert broken.error == "failed to import broken_mod:Broken: RuntimeError: boom: missing CUDA kernel"
    assert "broken" not in reg.names("objectives")
    assert {"lagrangian", "scaled"} <= set(reg.names("objectives"))
    with pytest.raises(UserError) as info:
        reg.get("objectives", "broken")
    assert info.value.lines == ["objective.characterization: objective 'broken' from broken-plugin 0.3 is "
                                "unusable: failed to import broken_mod:Broken: RuntimeError: boom: missing CUDA kernel"]


def test_an_entry_point_that_is_not_a_component_is_unusable(tmp_path, monkeypatch):
    root = tmp_path / "w"
    root.mkdir()
    make_dist(root, "odd-plugin", "0.1",
              {"flowspec.objectives": {"func": "odd_mod:func", "noopts": "odd_mod:NoOptions"}},
              {"odd_mod": "from flowspec.objectives.base import Objective\n"
                          "def func(): pass\n"
                          "class NoOptions(Objective):\n    Options = dict\n"})
    monkeypatch.syspath_prepend(str(root))
    reg = Registry(builtins_only=False)
    comps = reg.components("objectives")
    assert comps["func"].error == "odd_mod:func is not a subclass of flowspec.objectives.base.Objective"
    assert comps["noopts"].error == "odd_mod:NoOptions.Options is not a pydantic model"
    assert comps["func"].obj is None and "func" not in reg.names("objectives")
    # every other spec still validates
    assert validate(SPEC, "p.toml", reg).objective.characterization == "lagrangian"
    assert spec_errors(reg, objective={"characterization": "func"}) == [
        "p.toml: objective.characterization: objective 'func' from odd-plugin 0.1 is unusable: "
        "odd_mod:func is not a subclass of flowspec.objectives.base.Objective"]


def test_same_name_in_two_distributions_names_both(site):
    reg = Registry(builtins_only=False)
    twin = reg.components("interpolants")["twin"]
    assert twin.obj is None
    assert twin.error == ("interpolant 'twin' is registered by two distributions: "
                          "good-plugin (good_mod:Straight) and other-plugin (good_mod:Straight)"
                          ) or twin.error == ("interpolant 'twin' is registered by two distributions: "
                                              "other-plugin (good_mod:Straight) and good-plugin (good_mod:Straight)")
    assert "twin" not in reg.names("interpolants")


def test_builtins_only_switch(site, monkeypatch):
    assert Registry(builtins_only=True).names("objectives") == ["eulerian", "flow_matching", "fmm", "lagrangian",
                                                                 "progressive", "shortcut"]
    monkeypatch.setenv("FLOWSPEC_BUILTINS_ONLY", "1")
    reg = Registry()
    assert reg.builtins_only and "scaled" not in reg.components("objectives")
    assert "broken" not in reg.components("objectives")
    monkeypatch.setenv("FLOWSPEC_BUILTINS_ONLY", "0")
    assert "scaled" in Registry().components("objectives")


def test_a_spec_can_use_a_plugin(site):
    reg = Registry(builtins_only=False)
    spec = validate({**SPEC, "objective": {"characterization": "scaled", "diagonal_fraction": 0.5},
                     "interpolant": {"kind": "straight"}}, "p.toml", reg)
    assert spec.objective.characterization == "scaled" and spec.objective.diagonal_fraction == 0.5
    assert spec.interpolant.kind == "straight"


def spec_errors(reg: Registry, **sections) -> list[str]:
    with pytest.raises(UserError) as info:
        validate({**SPEC, **sections}, "p.toml", reg)
    return info.value.lines


def test_a_spec_naming_a_failing_plugin_gets_one_line_naming_it(site):
    reg = Registry(builtins_only=False)
    assert spec_errors(reg, objective={"characterization": "broken"}) == [
        "p.toml: objective.characterization: objective 'broken' from broken-plugin 0.3 is unusable: "
        "failed to import broken_mod:Broken: RuntimeError: boom: missing CUDA kernel"]
    lines = spec_errors(reg, interpolant={"kind": "twin"})
    assert len(lines) == 1 and lines[0].startswith(
        "p.toml: interpolant.kind: interpolant 'twin' from ")
    assert "is unusable: interpolant 'twin' is registered by two distributions: " in lines[0]
    assert "good-plugin" in lines[0] and "other-plugin" in lines[0]


def test_a_spec_naming_an_unknown_component(site):
    reg = Registry(builtins_only=False)
    (line,) = spec_errors(reg, objective={"characterization": "nope"})
    assert line.startswith("p.toml: objective.characterization: unknown name 'nope' (known: ")
    assert "scaled" in line and "lagrangian" in line and "broken" not in line


def test_a_failing_metric_is_named_in_eval_metrics(tmp_path, monkeypatch):
    root = tmp_path / "m"
    root.mkdir()
    make_dist(root, "bad-metric", "0.1", {"flowspec.metrics": {"sharpness": "nomod_xyz:Sharpness"}})
    monkeypatch.syspath_prepend(str(root))
    reg = Registry(builtins_only=False)
    lines = spec_errors(reg, eval={"metrics": ["kl", "sharpness"]})
    assert lines == ["p.toml: eval.metrics.1: metric 'sharpness' from bad-metric 0.1 is unusable: failed to import "
                     "nomod_xyz:Sharpness: ModuleNotFoundError: No module named 'nomod_xyz'"]


def cli(*args, site: Path, **env):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), **env}
    return subprocess.run([sys.executable, "-m", "flowspec", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_cli_plugins_and_validate_with_a_failing_plugin(site, tmp_path):
    proc = cli("plugins", site=site, COLUMNS="400")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[2].strip(): line for line in proc.stdout.splitlines() if line.count("│") >= 6}
    assert "good-plugin" in rows["scaled"] and "1.2.0" in rows["scaled"] and "ok" in rows["scaled"]
    assert "broken-plugin" in rows["broken"] and "RuntimeError: boom: missing CUDA kernel" in rows["broken"]
    assert "registered by two distributions" in rows["twin"]
    assert "flowspec" in rows["lagrangian"] and "ok" in rows["lagrangian"]

    spec = tmp_path / "s.toml"
    spec.write_text('[data]\nkind = "moons"\n[objective]\ncharacterization = "broken"\n')
    proc = cli("validate", spec, site=site)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"{spec}: objective.characterization: objective 'broken' from broken-plugin 0.3 is "
                           "unusable: failed to import broken_mod:Broken: RuntimeError: boom: missing CUDA kernel\n")

    proc = cli("plugins", site=site, COLUMNS="400", FLOWSPEC_BUILTINS_ONLY="1")
    assert proc.returncode == 0 and "broken" not in proc.stdout and "good-plugin" not in proc.stdout


def test_a_failing_plugin_in_a_one_member_group(tmp_path, monkeypatch):
    """networks has one usable member (mlp): pydantic reports a literal error, not a union tag."""
    root = tmp_path / "n"
    root.mkdir()
    make_dist(root, "convnet-plugin", "0.2", {"flowspec.networks": {"convnet": "convnet_mod:ConvNet"}},
              {"convnet_mod": "import flowspec_no_such_dependency\n"})
    monkeypatch.syspath_prepend(str(root))
    reg = Registry(builtins_only=False)
    del reg.components("networks")["unet"]  # the built-in U-Net aside, mlp is the one usable member
    assert spec_errors(reg, network={"kind": "convnet"}) == [
        "p.toml: network.kind: network 'convnet' from convnet-plugin 0.2 is unusable: failed to import "
        "convnet_mod:ConvNet: ModuleNotFoundError: No module named 'flowspec_no_such_dependency'"]
    (line,) = spec_errors(reg, network={"kind": "resnet"})
    assert line == "p.toml: network.kind: 'resnet' is not valid (valid: mlp)"
