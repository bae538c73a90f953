"""Bad input never gives a traceback: one line with the file and key, exit 2 (input) or 1 (runtime),
nothing half-written. Plus: nothing in flowspec can unpickle a user's file."""

from __future__ import annotations

import errno
import math
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "tiny",
    "data": {"kind": "checkerboard"},
    "interpolant": {"kind": "linear", "base_scale": "data_std"},
    "network": {"kind": "mlp", "width": 32, "depth": 2},
    "objective": {"characterization": "lagrangian"},
    "train": {"steps": 6, "batch_size": 64, "lr": 0.001, "ema": 0.99, "seed": 7, "device": "cpu"},
    "eval": {"steps": [1, 2], "num_samples": 400},
}
#: key -> values that are out of range for it
OUT_OF_RANGE = {
    "train.lr": [0.0, -1e-3, -5.0],
    "train.steps": [0, -1],
    "train.batch_size": [0, -64],
    "train.ema": [1.0, -0.5, 2.0],
    "train.grad_clip": [-1.0],
    "train.seed": [-1, 2**40],
    "train.keep_checkpoints": [-1],
    "network.width": [0, -3],
    "network.depth": [0],
    "objective.diagonal_fraction": [-0.01, 1.01, 7.0],
    "eval.num_samples": [0],
    "eval.steps": [[], [0], [2, -1]],
}
NUMERIC = ["train.lr", "train.steps", "train.batch_size", "train.ema", "train.seed", "network.width",
           "network.depth", "objective.diagonal_fraction", "eval.num_samples"]
NAMES = {"data.kind": "checkerboard", "network.kind": "mlp", "interpolant.kind": "linear",
         "objective.characterization": "lagrangian", "train.optimizer": "radam", "train.device": "cpu"}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def to_toml(data: dict) -> str:
    head = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(head) + "\n\n" + "\n\n".join(tables) + "\n"


def with_value(key: str, value) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    section, _, name = key.partition(".")
    data[section][name] = value
    return data


words = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


@st.composite
def malformed(draw) -> tuple[str, str]:
    """(TOML text, the dotted key the error must name; "" for a syntax error)."""
    kind = draw(st.sampled_from(["range", "type", "unknown_key", "unknown_name", "nonfinite", "bool",
                                 "not_table", "syntax"]))
    if kind == "range":
        key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        return to_toml(with_value(key, draw(st.sampled_from(OUT_OF_RANGE[key])))), key
    if kind == "type":
        key = draw(st.sampled_from(NUMERIC))
        return to_toml(with_value(key, draw(words) + "!")), key
    if kind == "unknown_key":
        section = draw(st.sampled_from(["data", "interpolant", "network", "objective", "train", "eval"]))
        name = draw(words.filter(lambda w: w not in ("kind", "characterization")))
        text = to_toml(with_value(f"{section}.x_{name}", 1))
        return text, f"{section}.x_{name}"
    if kind == "unknown_name":
        key = draw(st.sampled_from(sorted(NAMES)))
        name = draw(words.filter(lambda w: w != NAMES[key])) + "9"
        return to_toml(with_value(key, name)), key
    if kind == "nonfinite":
        key = draw(st.sampled_from(["train.lr", "train.ema", "objective.diagonal_fraction", "train.grad_clip"]))
        return to_toml(with_value(key, draw(st.sampled_from([math.nan, math.inf, -math.inf])))), key
    if kind == "bool":
        key = draw(st.sampled_from(NUMERIC))
        return to_toml(with_value(key, draw(st.booleans()))), key
    if kind == "not_table":
        section = draw(st.sampled_from(["data", "objective", "train", "eval", "network"]))
        data = dict(BASE)
        del data[section]
        text = f"{section} = {toml_value(draw(st.one_of(words, st.integers(), st.lists(st.integers(), max_size=2))))}\n"
        return text + to_toml(data), section
    good = to_toml(BASE)
    at = draw(st.integers(0, len(good)))
    junk = draw(st.sampled_from(["[", "]", "=", '"', "[[", "= =", "\x07", "key", "[train]\n"]))
    return good[:at] + junk + good[at:], ""


def is_toml(text: str) -> bool:
    from flowspec.spec import tomllib  # tomli before Python 3.11

    try:
        tomllib.loads(text)
        return True
    except tomllib.TOMLDecodeError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed())
def test_malformed_specs_give_one_line_and_exit_2(case, tmp_path, main):
    text, key = case
    if key == "" and is_toml(text):  # the junk happened to land somewhere harmless
        return
    path = tmp_path / "spec.toml"
    path.write_text(text)
    code, out, err = main("validate", path)
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 1, err
    if key:
        assert lines[0].startswith(f"{path}: {key}"), err
    else:
        assert lines[0].startswith(f"{path}: TOML syntax error: "), err
    assert "Traceback" not in err and "internal error" not in err


# -- a corpus with exact messages, through `flowspec run` (validation and compilation) --------------

TINY_TEXT = TINY.format(characterization="lagrangian")
CORPUS = [
    ("bool steps", ("steps = 6", "steps = true"), "train.steps: must be a number, not a boolean (got true)"),
    ("infinite lr", ("[train]", "[train]\nlr = inf"), "train.lr: must be a finite number (got inf)"),
    ("negative lr", ("[train]", "[train]\nlr = -0.1"), "train.lr: must be greater than 0 (got -0.1)"),
    ("diagonal fraction",
     ('characterization = "lagrangian"', 'characterization = "lagrangian"\ndiagonal_fraction = 1.5'),
     "objective.diagonal_fraction: must be less than or equal to 1 (got 1.5)"),
    ("empty steps", ("steps = [1, 2]", "steps = []"),
     "eval.steps: list should have at least 1 item after validation, not 0"),
    ("zero batch", ("batch_size = 64", "batch_size = 0"),
     "train.batch_size: must be greater than or equal to 1 (got 0)"),
    ("unknown key", ("[train]", "[train]\nlearning_rate = 1"), "train.learning_rate: unknown key (valid: steps, "
     "batch_size, optimizer, lr, schedule, warmup_steps, decay_start, grad_clip, ema, ema_schedule, seed, device, "
     "checkpoint_every, log_every, keep_checkpoints, precision, compile, nonfinite, "
     "grad_accum, parallel, ddp_bucket_mb, ddp_comm)"),
    ("unknown dataset", ('kind = "checkerboard"', 'kind = "checkerbord"'),
     "data.kind: unknown name 'checkerbord' (known: checkerboard, cifar10, digits, eight_gaussians, gaussian, gmm, "
     "image_folder, mnist, moons)"),
    ("base scale union", ('base_scale = "data_std"', 'base_scale = "big"'),
     "interpolant.base_scale: 'big' is not valid (valid: a number, data_std)"),
    ("negative base scale", ('base_scale = "data_std"', "base_scale = -1.0"),
     "interpolant.base_scale: -1.0 is not valid (valid: a number greater than 0, data_std)"),
    ("path in name", ('name = "tiny"', 'name = "../../etc"'),
     "name: must be a plain folder name: not empty, no '/', '\\' or control characters, not starting with '.' "
     "(got '../../etc')"),
    ("teacher without section",
     ('characterization = "lagrangian"', 'characterization = "lagrangian"\ntarget = "teacher"'),
     'objective.target: "teacher" needs a [teacher] section (kind = "analytic", or kind = "run" '
     'with path = "RUN_FOLDER")'),
    ("duplicate key", ("steps = 6", "steps = 6\nsteps = 7"),
     "TOML syntax error: Cannot overwrite a value (at line 21, column 10)"),
]


@pytest.mark.parametrize("name, edit, message", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_of_mistakes_is_one_exact_line(name, edit, message, tmp_path, main):
    path = tmp_path / "spec.toml"
    text = TINY_TEXT.replace(*edit)
    assert text != TINY_TEXT
    path.write_text(text)
    code, out, err = main("run", path, "--out", tmp_path / "run")
    assert (code, err.strip()) == (2, f"{path}: {message}")
    assert not (tmp_path / "run").exists()


def test_empty_and_missing_and_unreadable_files(tmp_path, main):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n")
    assert main("validate", empty)[::2] == (
        2, f"{empty}: the spec is empty (it needs at least [data] and [objective])\n")
    missing = tmp_path / "missing.toml"
    assert main("run", missing)[::2] == (2, f"{missing}: no such file\n")
    assert main("validate", tmp_path)[::2] == (2, f"{tmp_path}: cannot read: Is a directory\n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"name = \"\xff\xfe\"\n")
    assert main("validate", binary)[::2] == (2, f"{binary}: cannot read: not UTF-8 text (byte 8)\n")


def test_unwritable_output_folder(tiny_spec, tmp_path, main):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = main("run", tiny_spec(), "--out", blocker / "run")
    assert (code, err.strip()) == (1, f"{blocker / 'run'}: cannot write the run folder: Not a directory")


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_spec, tmp_path, main, monkeypatch):
    import flowspec.atomic

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(flowspec.atomic.os, "fsync", no_space)
    out = tmp_path / "run"
    code, _, err = main("run", tiny_spec(), "--out", out)
    assert (code, err.strip().splitlines()[1:]) == (1, [f"{out / 'spec.toml'}: cannot write: No space left on device"])
    assert not out.exists()  # the run never started: no folder left behind


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tiny_spec, tmp_path, main, monkeypatch):
    import flowspec.checkpoint

    real = flowspec.checkpoint.save_bytes
    calls = []

    def save_then_fill(tensors, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, **kw)

    monkeypatch.setattr(flowspec.checkpoint, "save_bytes", save_then_fill)
    out = tmp_path / "run"
    code, _, err = main("run", tiny_spec(), "--out", out, "--set", "train.checkpoint_every=2")
    ckpt = out / "checkpoints"
    assert (code, err.strip().splitlines()[-1]) == (
        1, f"{ckpt / 'step-00000004.safetensors'}: cannot write: No space left on device")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000002.safetensors"]
    assert (ckpt / "latest").read_text() == "step-00000002\n"


# -- safe loading -----------------------------------------------------------------------------------

UNSAFE = re.compile(r"\b(torch\.load|torch\.jit\.load|pickle\.loads?|cPickle|_pickle|dill|joblib|shelve|"
                    r"marshal\.loads?|load_state_dict_from_url|allow_pickle\s*=\s*True|"
                    r"weights_only\s*=\s*False|Unpickler)\b")


def test_nothing_in_flowspec_can_unpickle():
    files = sorted((ROOT / "flowspec").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    assert len(files) > 10
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert hits == []
