"""``flowspec validate`` finds what ``flowspec run`` would, at once, without building anything;
absurd sizes, deep nesting and long values are one line each, and nothing is written."""

from __future__ import annotations

import pytest

from tests.conftest import TINY

TINY_TEXT = TINY.format(characterization="lagrangian")

#: (overrides, the line validate prints after the file name)
MISTAKES = [
    (['objective.target="teacher"'],
     'objective.target: "teacher" needs a [teacher] section (kind = "analytic", or kind = "run" '
     'with path = "RUN_FOLDER")'),
    (['data.kind="moons"', 'teacher={kind="analytic"}', 'eval.metrics=["energy"]'],
     'teacher.kind: "analytic" needs a dataset with a closed-form velocity; moons has none '
     "(valid: gaussian, gmm, eight_gaussians, checkerboard)"),
    (['data.kind="moons"'], "eval.metrics: kl needs a 2-D dataset with a known density; Moons has none"),
    (['eval.metrics=["digits_fd"]'],
     "eval.metrics: digits_fd needs 8 x 8 digit images of shape (1, 8, 8); Checkerboard has shape (2,)"),
    (["eval.metric_options={kl={bins=0}}"],
     "eval.metric_options.kl.bins: must be greater than 0 (got 0) (valid keys: bins)"),
    (['eval.metric_options={fid={weights="x"}}'],
     "eval.metric_options.fid: fid is not in eval.metrics (valid: kl, energy)"),
    (['eval.ode=[{solver="euler",steps=4,velocity="teacher"}]'],
     'eval.ode: teacher euler K=4: velocity = "teacher" needs a [teacher] section'),
    (["train.batch_size=1e11"], "train.batch_size: 100,000,000,000 samples of shape (2,) need at least "),
    (["network.width=4611686018427387904"],
     "network.width: 4611686018427387904 asks for a network that cannot be built"),
    (["network.width=1000000"], "network.width: 1000000 gives 1,000,008,000,002 parameters, about "),
    (["data.scale=1e38"], "data.scale: the data's standard deviation is 1.15e+38; losses (sums of squares) overflow"),
    ([f'name="{"n" * 300}"'],
     "name: must be at most 100 bytes long (it names a folder, with a timestamp added) (got 'nnn"),
]


@pytest.mark.parametrize("overrides, line", MISTAKES, ids=[m[1][:30] for m in MISTAKES])
def test_validate_and_run_report_the_same_one_line(overrides, line, tmp_path, main):
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY_TEXT)
    sets = [a for o in overrides for a in ("--set", o)]
    code, out, err = main("validate", spec, *sets)
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{spec}: {line}"), err
    code, _, err_run = main("run", spec, *sets, "--out", tmp_path / "run")
    assert code == 2 and err_run == err
    assert not (tmp_path / "run").exists()


def test_every_mistake_at_once(tmp_path, main):
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY_TEXT)
    code, _, err = main("validate", spec, "--set", 'objective.target="teacher"', "--set", "train.batch_size=1e11",
                        "--set", 'eval.metrics=["digits_fd"]', "--set", 'teacher={kind="run",path="nowhere"}')
    lines = err.strip().splitlines()
    assert code == 2 and [line.split(": ")[1] for line in lines] == [
        "teacher.path", "train.batch_size", "eval.metrics"], err
    assert lines[0] == f"{spec}: teacher.path: {tmp_path / 'nowhere'}: not a run folder (no spec.toml)"


def test_unet_on_2d_data(tmp_path, main):
    spec = tmp_path / "spec.toml"
    spec.write_text('[data]\nkind = "checkerboard"\n[network]\nkind = "unet"\n[objective]\n'
                    'characterization = "lagrangian"\n[eval]\nmetrics = ["energy"]\n')
    code, _, err = main("validate", spec)
    assert code == 2 and err.strip().startswith(f'{spec}: network.kind: "unet" needs image data of shape (C, H, W)')


def test_deep_nesting_and_long_values_are_one_short_line(tmp_path, main):
    deep = tmp_path / "deep.toml"
    deep.write_text(TINY_TEXT.replace("[train]", "[train]\nx = " + "[" * 50_000 + "]" * 50_000))
    code, _, err = main("validate", deep)
    assert (code, err.strip()) == (2, f"{deep}: TOML: values nested too deeply (at most 32 levels)")
    plain = tmp_path / "plain.toml"
    plain.write_text(TINY_TEXT)
    code, _, err = main("validate", plain, "--set", "train.x=" + "[" * 50_000 + "]" * 50_000)
    assert (code, err.strip()) == (2, "--set train.x: the value is nested too deeply (at most 32 levels)")
    long = tmp_path / "long.toml"
    long.write_text(TINY_TEXT.replace("steps = 6", 'steps = "' + "x" * 1_000_000 + '"'))
    code, _, err = main("validate", long)
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 300, err[:300]
    key = tmp_path / "key.toml"
    key.write_text(TINY_TEXT.replace("[train]", "[train]\n" + "k" * 5000 + " = 1"))
    code, _, err = main("validate", key)
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 600, err[:300]
