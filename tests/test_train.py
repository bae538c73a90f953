"""The training loop: reproducibility, EMA warm-up, schedules, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from flowspec import checkpoint, engine
from flowspec.compile import compile_spec
from flowspec.engine import EMA, lr_factor
from flowspec.errors import UserError
from flowspec.runlog import RunLog, truncate_metrics
from flowspec.spec import EvalOptions, TrainOptions, load_spec
from flowspec.train import Cadence, train


def weights(graph):
    return {k: v.clone() for k, v in graph.model.state_dict().items()}


@pytest.mark.parametrize("characterization", ["lagrangian", "eulerian", "progressive", "flow_matching"])
def test_cpu_runs_are_bit_reproducible(tiny_spec, characterization):
    spec = load_spec(tiny_spec(characterization))
    a, b = compile_spec(spec), compile_spec(spec)
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))
    for _ in range(4):
        la, lb = engine.step(a), engine.step(b)
        assert torch.equal(la.loss, lb.loss)
    assert all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(b).values()))
    c = compile_spec(load_spec(tiny_spec(characterization), ["train.seed=8"]))
    engine.step(c)
    assert not all(torch.equal(x, y) for x, y in zip(weights(a).values(), weights(c).values()))


def test_training_moves_the_diagonal_toward_the_exact_velocity(tiny_spec):
    """The loss itself is mostly the conditional variance of dI/dt (its floor): measure instead the
    diagonal's error against the checkerboard's closed-form velocity, on fixed points."""
    g = compile_spec(load_spec(tiny_spec("lagrangian"), ["train.batch_size=256", 'train.optimizer="adam"',
                                                         "train.lr=3e-3"]))
    gen = torch.Generator().manual_seed(0)
    x1 = g.dataset.sample(2000, gen)
    x0 = torch.randn(2000, 2, generator=gen) * g.base.scale
    t = torch.rand(2000, generator=gen)
    xt, _ = g.interpolant.interpolate(t, x0, x1)

    def error() -> float:
        with torch.no_grad():
            return float((g.model.velocity(t, xt) - g.exact.velocity(t, xt)).pow(2).sum(1).mean())

    before = error()
    for _ in range(60):
        engine.step(g)
    assert error() < 0.5 * before


def test_ema_warms_up():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.999, 2/11): the average moves most of the way
    assert ema.model.weight.item() == pytest.approx(1 - 2 / 11)
    assert EMA(model, 0.0).decay == 0.0


def test_lr_schedules():
    const = TrainOptions(steps=100)
    assert lr_factor(const, 0) == lr_factor(const, 99) == 1.0
    warm = TrainOptions(steps=100, warmup_steps=10)
    assert lr_factor(warm, 0) == pytest.approx(0.1) and lr_factor(warm, 9) == 1.0
    cos = TrainOptions(steps=100, schedule="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 50) == pytest.approx(0.5)
    assert lr_factor(cos, 100) == pytest.approx(0)
    sq = TrainOptions(steps=100, schedule="sqrt", decay_start=10)
    assert lr_factor(sq, 8) == 1.0 and lr_factor(sq, 39) == pytest.approx(0.5)


def test_checkpoint_round_trip_and_corruption(tiny_spec, tmp_path):
    g = compile_spec(load_spec(tiny_spec()))
    for _ in range(3):
        engine.step(g)
    path = checkpoint.save(g, tmp_path)
    assert checkpoint.latest(tmp_path) == path
    ckpt = checkpoint.read(path, 1 << 30)
    assert ckpt.state["step"] == 3 and len(ckpt.digest) == 64
    fresh = compile_spec(load_spec(tiny_spec(), ["train.seed=99"]))
    checkpoint.load_module(fresh.ema.model, ckpt.tensors, "ema", path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.model.state_dict().values(),
                                                   g.ema.model.state_dict().values()))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        checkpoint.read(path, 1 << 30)
    assert not list(tmp_path.rglob(".*.safetensors.*"))  # no temporary files left behind


def test_checkpoint_mismatch_names_parameters(tiny_spec, tmp_path):
    g = compile_spec(load_spec(tiny_spec()))
    path = checkpoint.save(g, tmp_path)
    wide = compile_spec(load_spec(tiny_spec(), ["network.width=16"]))
    with pytest.raises(UserError, match=r"wrong shape: .*net\.layers\.0\.weight"):
        checkpoint.load_module(wide.ema.model, checkpoint.load_tensors(path), "ema", path)


def test_train_writes_eval_and_stops_on_nan(tiny_spec, tmp_path):
    g = compile_spec(load_spec(tiny_spec("progressive")))
    results = train(g, tmp_path / "ok")
    assert set(results) == {"1", "2"}
    bad = compile_spec(load_spec(tiny_spec("lagrangian"), ["train.lr=1e30", "train.grad_clip=0"]))
    with torch.no_grad():
        for p in bad.model.parameters():
            p.fill_(float("nan"))
    (tmp_path / "nan").mkdir()
    with pytest.raises(UserError, match=r"^step 1: loss term 'diagonal' is nan; stopped"):
        train(bad, tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoints").exists()  # no checkpoint of bad weights


def test_cadence_is_a_function_of_the_step():
    """Log every 3 steps and at the end; evaluate every 4 and checkpoint every 5 before the end (the
    end's own evaluation and checkpoint are the run's last)."""
    c = Cadence(TrainOptions(steps=10, log_every=3, checkpoint_every=5), EvalOptions(every=4))
    assert [k for k in range(1, 11) if c.log(k)] == [3, 6, 9, 10]
    assert [k for k in range(1, 11) if c.evaluate(k)] == [4, 8]
    assert [k for k in range(1, 11) if c.checkpoint(k)] == [5]
    never = Cadence(TrainOptions(steps=10, checkpoint_every=0), EvalOptions(every=0))
    assert not any(never.evaluate(k) or never.checkpoint(k) for k in range(1, 11))


def test_run_log_appends_finishes_and_truncates(tiny_spec, tmp_path):
    graph = compile_spec(load_spec(tiny_spec("lagrangian")))
    with RunLog(graph, tmp_path) as log:
        for k in (1, 2, 3):
            log.write({"step": k, "loss": float(k)})
        log.write({"step": 2, "eval": {"1": {"kl": 0.5}}})
        graph.step_count = 3
        log.finish(graph, {"1": {"kl": 0.25}}, {})
    assert (tmp_path / "spec.toml").is_file() and (tmp_path / "environment.json").is_file()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval" in r) for r in lines] == [(1, False), (2, False), (3, False), (2, True), (3, True)]
    assert json.loads((tmp_path / "eval.json").read_text())["steps"] == {"1": {"kl": 0.25}}
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a kill
    truncate_metrics(tmp_path, 3, final=True)  # resuming at step 3: the final evaluation goes too
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval" in r) for r in lines] == [(1, False), (2, False), (3, False), (2, True)]
    assert RunLog(graph, None).path is None  # another rank: writes nothing
