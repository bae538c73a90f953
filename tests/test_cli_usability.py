"""What a user expects of the command line before any training: --version, -h, shell completion, a
--help that answers at once (torch is not imported), flags shown as flags, and `explain` printing the
objective's whole formula."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_version(main):
    from importlib.metadata import version

    code, out, _ = main("--version")
    assert code == 0 and out == f"flowspec {version('flowspec')}\n"


def test_h_is_help_everywhere(main):
    for args in (("-h",), ("run", "-h"), ("explain", "-h")):
        code, short, _ = main(*args)
        assert code == 0 and short.startswith("Usage: ")
        assert main(*args[:-1], "--help")[1] == short


def test_help_shows_flags_as_flags_and_whole_command_sentences(main, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, text, _ = main("run", "-h")
    assert code == 0 and "<bool>" not in text
    assert any(line.split()[:1] == ["--force"] and "overwrite" in line for line in text.splitlines())
    assert "--set SECTION.KEY=VALUE" in text
    code, top, _ = main("-h")
    commands = top.split("Commands:\n", 1)[1]
    assert code == 0 and "..." not in commands  # each command's first sentence whole, wrapped
    for option in ("--version", "--install-completion", "--show-completion", "-h, --help"):
        assert option in top


def test_shell_completion_completes_commands_and_options():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "_FLOWSPEC_COMPLETE": "complete_bash",
           "COMP_WORDS": "flowspec run --fo", "COMP_CWORD": "2"}
    code = "import sys; sys.argv = ['flowspec']; from flowspec.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["--force"], r.stderr


def test_help_and_version_do_not_import_torch():
    """`flowspec --help` answers without torch (3-8 s of imports on a busy machine): importing the
    package and its command line, and printing help or the version, load no torch module."""
    code = ("import sys\nfrom flowspec.cli import main\nimport flowspec\n"
            "for args in (['--help'], ['--version'], ['run', '--help']):\n"
            "    sys.argv = ['flowspec', *args]\n"
            "    try:\n        main()\n    except SystemExit as exc:\n        assert exc.code in (0, None), exc.code\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"


def test_public_names_load_on_first_use():
    """The lazy package still hands out the functions (flowspec.train is the function, not the
    submodule of that name, even after the submodule is imported)."""
    import flowspec
    import flowspec.train as _module  # noqa: F401  (the import that would rebind the attribute)
    from flowspec import RunFolder, compile_spec, load_spec, resume, train
    from flowspec.runs import RunFolder as Direct

    assert callable(train) and train is flowspec.train and train.__module__ == "flowspec.train"
    assert RunFolder is Direct and callable(compile_spec) and callable(load_spec) and callable(resume)
    assert set(flowspec.__all__) <= set(dir(flowspec))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        flowspec.nothing_here  # noqa: B018


def test_explain_prints_the_whole_formula(tiny_spec, main):
    code, out, err = main("explain", tiny_spec("lagrangian"))
    assert code == 0, err
    assert out.split("\n\n", 1)[1] == (
        "  objective:\n"
        "    x = I_s; (X, dX/dt) = jvp(t -> X_{s,t}(x), tangent 1)   (forward mode in t)\n"
        "    r = dX/dt - sg(b-hat_t(sg(X)))   b-hat: the model's diagonal v_{t,t} (self) or the teacher's b_t\n"
        "    gradient only through dX/dt; per-sample loss |r|^2; diagonal samples |v_{t,t}(I_t) - dI_t/dt|^2\n")


def test_explain_of_an_objective_without_a_formula_prints_its_whole_docstring():
    """An objective with no ``formula`` attribute: every paragraph of its module's docstring after the
    summary (the formula may span several), indentation kept relative; then the class docstring."""
    from flowspec.explain import formula
    from flowspec.objectives.lagrangian import Lagrangian

    module = types.ModuleType("fake_objective", "A summary line.\n\n    Residual:\n\n        r = a - b\n"
                              "        s = c\n\n    The last paragraph.\n    ")
    sys.modules[module.__name__] = module
    try:
        cls = type("Bare", (Lagrangian,), {"formula": "", "__module__": module.__name__, "__doc__": "From the class."})
        assert formula(cls()) == "Residual:\n\n    r = a - b\n    s = c\n\nThe last paragraph."
        module.__doc__ = "Only a summary."
        assert formula(cls()) == "Only a summary."
        module.__doc__ = None
        assert formula(cls()) == "From the class."
    finally:
        del sys.modules[module.__name__]
