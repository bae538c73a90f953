"""The README's one-line switches work as written: the spec it shows with each characterization its
comment offers, each row of its Methods table, and each `--set` example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_spec() -> str:
    """The spec of the README's "A spec" section (its first toml block)."""
    return re.search(r"```toml\n(.*?)```", README, re.S).group(1)


def offered_characterizations() -> list[str]:
    """The alternatives the README spec's comment names: characterization = "x"  # or "a", "b", ..."""
    line = next(line for line in readme_spec().splitlines() if line.startswith("characterization"))
    return re.findall(r'"(\w+)"', line.split("#", 1)[1])


def method_rows() -> list[list[str]]:
    """Each row of the Methods table as the --set overrides its first column spells out, one list
    per characterization it names (target, options such as gamma; a teacher row gets the analytic
    teacher)."""
    from flowspec.registry import default_registry

    names = set(default_registry().names("objectives"))
    section = README.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        spans = re.findall(r"`([^`]+)`", first)
        options = [f"objective.{k.strip()}={v.strip()}" for k, _, v in (s.partition("=") for s in spans if "=" in s)]
        target = re.search(r"target (self|teacher|conditional)", first)
        if target:
            options.append(f"objective.target={target.group(1)}")
            if target.group(1) == "teacher":
                options.append("teacher.kind=analytic")
        rows += [[f"objective.characterization={c}", *options] for c in spans if c in names]
    return rows


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "readme.toml"
    path.write_text(readme_spec())
    return path


def test_the_readme_finds_what_it_tests():
    assert offered_characterizations() == ["eulerian", "progressive", "flow_matching"]
    firsts = {row[0].split("=")[1] for row in method_rows()}
    assert firsts == {"lagrangian", "eulerian", "progressive", "flow_matching", "shortcut", "fmm"}


@pytest.mark.parametrize("characterization", offered_characterizations())
def test_each_offered_characterization_is_a_one_line_switch(characterization, spec_file, main):
    """Flow matching included: it sets its own eta = 1 over the spec's diagonal_fraction = 0.75."""
    for path in (spec_file, ROOT / "specs" / "checkerboard-lsd.toml"):
        code, out, err = main("validate", path, "--set", f"objective.characterization={characterization}")
        assert (code, err) == (0, ""), err
        assert out.strip() == f"{path}: ok"


def test_flow_matching_sets_its_own_eta(spec_file):
    from flowspec.spec import load_spec

    spec = load_spec(spec_file, ["objective.characterization=flow_matching"])
    assert spec.objective.diagonal_fraction == 1.0


@pytest.mark.parametrize("overrides", method_rows(), ids=lambda o: " ".join(x.split("=", 1)[1] for x in o))
def test_each_method_row_is_a_switch_of_the_readme_spec(overrides, spec_file, main):
    code, out, err = main("validate", spec_file, *sets(overrides))
    assert (code, err) == (0, ""), err


def test_the_set_examples(main):
    found = re.findall(r"--set ([a-z_]+\.[\w.]+=[^`\s]+)", README)
    # a bracket closing the usage's optional part is not the value's; placeholders are not examples
    found = [e[:-1] if e.count("]") > e.count("[") else e for e in found]
    examples = [e for e in found if not e.startswith("section.") and not re.fullmatch(r"[A-Z]+", e.split("=", 1)[1])]
    assert "eval.steps=[1,2]" in examples
    for example in examples:
        code, _, err = main("validate", ROOT / "specs" / "checkerboard-lsd.toml", "--set", example)
        assert (code, err) == (0, ""), f"--set {example}: {err}"
