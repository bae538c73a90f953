"""Mixed precision and compilation: the jvp stays float32 under bf16 autocast with attention written
out; float64 runs; torch.compile'd forward passes with eager jvps."""

from __future__ import annotations

import torch

from flowspec import engine
from flowspec import jvp as jvp_module
from flowspec.compile import compile_spec
from flowspec.flowmap import FlowMap
from flowspec.jvp import jvp
from flowspec.spec import validate
from tests.test_unet import tiny_unet

DIGITS = {"data": {"kind": "digits"}, "interpolant": {"kind": "linear", "base_scale": 0.5},
          "network": {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                      "attention_resolutions": [4], "channels_per_head": 4, "embedding_dim": 8},
          "objective": {"characterization": "lagrangian"},
          "train": {"steps": 2, "batch_size": 8, "ema": 0.0},
          "eval": {"metrics": ["digits_fd"], "num_samples": 16, "steps": [1]}}


def _spec(**train):
    return validate({**DIGITS, "train": {**DIGITS["train"], **train}})


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g)
    s = torch.rand(6, generator=g) * 0.5
    return x, s, s + 0.3


def test_bf16_autocast_jvp_equals_the_float32_jvp_on_the_unet_with_attention():
    fm = FlowMap(tiny_unet(), scale=0.5)
    x, s, t = _inputs()
    f = lambda tt: fm(s, tt, x)  # noqa: E731
    ones = torch.ones_like(t)
    X32, d32 = jvp(f, (t,), (ones,))
    seen = {}

    def probe(tt):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["active"] = jvp_module.active()
        return f(tt)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        X16, d16 = jvp(probe, (t,), (ones,))
        _, naive = torch.func.jvp(f, (t,), (ones,))  # what the objective would get without the guard
        forward = f(t)
    assert seen == {"autocast": False, "active": True}
    assert not jvp_module.active()
    assert d16.dtype == torch.float32 and X16.dtype == torch.float32
    assert torch.allclose(d16, d32, rtol=0, atol=1e-6) and torch.allclose(X16, X32, rtol=0, atol=1e-6)
    assert forward.dtype == torch.float32  # the autocast forward pass itself ran in bf16 ...
    assert (forward - X32).abs().max() > 1e-4  # ... visibly less precise than the guarded jvp
    assert (naive.float() - d32).abs().max() > 10 * (d16 - d32).abs().max()


def test_finite_differences_leave_autocast_too():
    fm = FlowMap(tiny_unet(), scale=0.5).double()
    x, s, t = (a.double() for a in _inputs())
    f = lambda tt: fm(s, tt, x)  # noqa: E731
    _, exact = jvp(f, (t,), (torch.ones_like(t),))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fd = jvp(f, (t,), (torch.ones_like(t),), strategy="finite_difference")
    assert fd.dtype == torch.float64
    assert ((fd - exact).abs() / (1 + exact.abs())).max() < 1e-5


def test_bf16_training_step_keeps_float32_weights():
    g32, g16 = compile_spec(_spec()), compile_spec(_spec(precision="bf16"))
    out32, out16 = engine.step(g32), engine.step(g16)
    assert torch.isfinite(out16.loss) and out16.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in g16.model.parameters())
    assert abs(float(out16.loss.detach()) - float(out32.loss.detach())) < 0.05 * abs(float(out32.loss.detach()))
    assert all(torch.isfinite(p).all() for p in g16.model.parameters())


def test_bf16_steps_of_every_jvp_objective():
    for objective in ({"characterization": "eulerian"}, {"characterization": "eulerian", "target": "conditional"},
                      {"characterization": "lagrangian", "learned_weight": True}):
        g = compile_spec(validate({**DIGITS, "objective": objective,
                                   "train": {**DIGITS["train"], "precision": "bf16"}}))
        out = engine.step(g)
        assert torch.isfinite(out.loss.detach()), objective
        assert g.last_fault is None


def test_float64_run_with_finite_differences():
    spec = validate({**DIGITS, "train": {**DIGITS["train"], "precision": "float64"},
                     "objective": {"characterization": "lagrangian", "jvp": "finite_difference"}})
    g = compile_spec(spec)
    assert all(p.dtype == torch.float64 for p in g.model.parameters())
    assert engine.draw_batch(g, 4).x1.dtype == torch.float64
    out = engine.step(g)
    assert out.loss.dtype == torch.float64 and torch.isfinite(out.loss)
    from flowspec.evaluate import evaluate

    assert set(evaluate(g)["1"]) == {"digits_fd", "nfe", "seconds"}


def test_compiled_forward_passes_and_eager_jvps():
    fm = FlowMap(tiny_unet(), scale=0.5)
    calls = {"eager": 0}
    hook = fm.net.register_forward_hook(lambda *a: calls.__setitem__("eager", calls["eager"] + 1))
    fm.compile_network(backend="eager")
    x, s, t = _inputs()
    with torch.no_grad():
        reference = fm.net(x / 0.5, s, t) * 0.5
    calls["eager"] = 0
    assert torch.allclose(fm.v(s, t, x), reference, atol=1e-6)
    _, d = jvp(lambda tt: fm(s, tt, x), (t,), (torch.ones_like(t),))
    assert calls["eager"] >= 1  # the jvp went through the eager module
    assert torch.isfinite(d).all()
    # neither the state dict nor a deep copy (the EMA) carries the compiled view
    import copy

    assert not any("_orig_mod" in k for k in fm.state_dict())
    assert copy.deepcopy(fm)._compiled is None
    hook.remove()


def test_the_unet_compiles_to_one_graph():
    """No graph break: at a break dynamo compiles the callee apart, and attention's, called at several
    shapes, went dynamic and crashed inductor on the CIFAR-10 U-Net (reading the jvp context variable
    was the break)."""
    import torch._dynamo

    x, s, t = _inputs()
    explained = torch._dynamo.explain(tiny_unet())(x, s, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
