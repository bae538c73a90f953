"""train.compile: the whole loss under torch.compile, forward-mode jvps included (flowspec.jvp,
"Compiled"). LSD's and ESD's losses trace to one graph (fullgraph=True) and give the eager loss
and gradients to float32 tolerance on a tiny MLP."""
from __future__ import annotations

import pytest
import torch

from flowspec import engine
from flowspec import jvp as jvp_module
from flowspec.compile import compile_spec
from flowspec.spec import load_spec

CASES = {
    "lsd": ("lagrangian", []),
    "esd": ("eulerian", []),  # stop_gradient = "full": a second, gradient-free jvp
    "esd-none": ("eulerian", ['objective.stop_gradient="none"']),
    "fm": ("flow_matching", []),
}


def _graph(tiny_spec, case: str, extra: tuple[str, ...] = ()):
    characterization, overrides = CASES[case]
    return compile_spec(load_spec(tiny_spec(characterization), overrides=[*overrides, *extra]))


def _loss_and_grads(module, graph, args):
    graph.model.zero_grad(set_to_none=True)
    out = module(*args)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in graph.model.parameters() if p.grad is not None]


def _args(graph):
    n = graph.spec.train.batch_size
    batch = engine.draw_batch(graph, n)
    s, t, n_diag = graph.objective.sample_times(n, batch.x0.device, batch.x0.dtype, graph.generator)
    assert 0 < n_diag and (n_diag < n or graph.objective.characterization == "flow_matching")
    return batch, s, t, n_diag


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_loss_compiles_to_one_graph_and_equals_the_eager_loss(tiny_spec, case):
    torch._dynamo.reset()
    graph = _graph(tiny_spec, case)
    module = graph.loss_module
    args = _args(graph)
    loss, grads = _loss_and_grads(module, graph, args)
    # fullgraph: any graph break is an error; aot_eager: AOT autograd traces the dual tensors (the
    # step that failed on a view of a dual tensor), without inductor's C++ compilation
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    c_loss, c_grads = _loss_and_grads(compiled, graph, args)
    assert not jvp_module.active()
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert len(c_grads) == len(grads)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_train_compile_compiles_the_loss_module_and_steps(tiny_spec):
    """train.compile = true: the step's loss module is compiled (inductor), and its loss is the
    eager graph's on the same batch and weights."""
    torch._dynamo.reset()
    graph = _graph(tiny_spec, "lsd", ("train.compile=true",))
    reference = _graph(tiny_spec, "lsd")
    assert graph.loss_module is not None and graph.loss_module._compiled_call_impl is not None
    reference.model.load_state_dict(graph.model.state_dict())
    args = _args(graph)
    loss, grads = _loss_and_grads(reference.loss_module, reference, args)
    c_loss, c_grads = _loss_and_grads(graph.loss_module, graph, args)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out = engine.step(graph)
    assert torch.isfinite(out.loss)
