"""The spec: defaults, overrides, round trip, and one-line errors that name the file and the key."""

from __future__ import annotations

import pytest

from flowspec.errors import UserError
from flowspec.spec import load_spec, read_toml, to_toml, validate


def errors_of(path, overrides=()):
    with pytest.raises(UserError) as info:
        load_spec(path, overrides)
    return info.value.lines


def test_defaults_are_filled_and_visible(tmp_path):
    path = tmp_path / "min.toml"
    path.write_text('[data]\nkind = "moons"\n[objective]\ncharacterization = "lagrangian"\n')
    spec = load_spec(path)
    assert spec.name == "min"
    assert spec.objective.diagonal_fraction == 0.75 and spec.objective.target == "self"
    assert spec.interpolant.kind == "linear" and spec.network.kind == "mlp"
    text = to_toml(spec)
    for key in ("diagonal_fraction = 0.75", "optimizer = \"radam\"", "base_scale = 1.0", "width = 512"):
        assert key in text


def test_resolved_spec_round_trips(tiny_spec, tmp_path):
    spec = load_spec(tiny_spec("progressive", 'gamma = "half"'))
    again = tmp_path / "again.toml"
    again.write_text(to_toml(spec))
    assert load_spec(again) == spec


def test_overrides_are_typed(tiny_spec):
    spec = load_spec(tiny_spec(), ["train.steps=11", "eval.steps=[1, 4]", "objective.characterization=eulerian",
                                   "train.optimizer=adam"])
    assert spec.train.steps == 11 and spec.eval.steps == [1, 4]
    assert spec.objective.characterization == "eulerian" and spec.train.optimizer == "adam"


def test_bad_override_syntax(tiny_spec):
    assert errors_of(tiny_spec(), ["train.steps"]) == [
        "--set train.steps: expected section.key=value (e.g. train.steps=100)"]


def test_every_mistake_is_reported_once_per_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[data]\nkind = "checkerbord"\n'
        '[objective]\ncharacterization = "lagrangian"\ndiagonal_fraction = 1.5\nlr = 3\n'
        '[train]\noptimizer = "sgd"\nlr = -1\nsteps = "many"\n'
        '[eval]\nsteps = []\nmetrics = ["inception_score"]\n'
    )
    lines = errors_of(path)
    src = str(path)
    assert all(line.startswith(f"{src}: ") and "\n" not in line for line in lines)
    joined = "\n".join(lines)
    assert f"{src}: data.kind: unknown name 'checkerbord' (known: " in joined and "checkerboard" in joined
    assert f"{src}: objective.diagonal_fraction: must be less than or equal to 1 (got 1.5)" in lines
    assert any(l.startswith(f"{src}: objective.lr: unknown key (valid: ") and "diagonal_fraction" in l for l in lines)
    assert f"{src}: train.optimizer: 'sgd' is not valid (valid: adam, radam)" in lines
    assert f"{src}: train.lr: must be greater than 0 (got -1)" in lines
    assert any(l.startswith(f"{src}: train.steps: ") for l in lines)
    assert any(l.startswith(f"{src}: eval.steps: ") for l in lines)
    assert any(l.startswith(f"{src}: eval.metrics.0: 'inception_score' is not valid (valid: ") for l in lines)
    assert len(lines) == 8


def test_missing_section_and_missing_kind(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\nscale = 2.0\n')
    lines = errors_of(path)
    assert f"{path}: objective: missing (required)" in lines
    assert any(l.startswith(f"{path}: data.kind: missing kind") for l in lines)


def test_toml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[data]\nkind = "checkerboard\n')
    with pytest.raises(UserError) as info:
        read_toml(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}: TOML syntax error: ") and "line 2" in line and "column" in line


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_spec(tmp_path / "nope.toml")


def test_objective_options_are_per_characterization():
    ok = validate({"data": {"kind": "checkerboard"}, "objective": {"characterization": "progressive", "gamma": "half"}})
    assert ok.objective.gamma == "half"
    with pytest.raises(UserError) as info:
        validate({"data": {"kind": "checkerboard"},
                  "objective": {"characterization": "lagrangian", "gamma": "half"}}, "x.toml")
    assert info.value.lines[0].startswith("x.toml: objective.gamma: unknown key (valid: ")


def test_docs_spec_reference_is_generated_from_the_models():
    from pathlib import Path

    from flowspec.registry import Registry
    from flowspec.spec.reference import reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
    assert doc.read_text() == reference(Registry(builtins_only=True)), (
        "docs/spec.md is stale: FLOWSPEC_BUILTINS_ONLY=1 flowspec schema --markdown > docs/spec.md")


def test_biased_meanflow_combination_is_refused():
    with pytest.raises(UserError) as info:
        validate({"data": {"kind": "checkerboard"}, "objective": {
            "characterization": "eulerian", "target": "conditional", "stop_gradient": "none"}}, "m.toml")
    assert info.value.lines == ["m.toml: objective: stop_gradient = 'none' with target = 'conditional' is "
                                "biased (its minimizer is not the flow map); use stop_gradient = 'full'"]
