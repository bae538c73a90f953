"""Step cost: milliseconds per training step of each objective against a flow-matching step.

Every method is compiled from its spec in specs/ with the same network (the paper's 4 x 512 GELU MLP),
batch, optimizer, clipping and EMA, and timed through ``flowspec.engine.step(graph)`` (sampling the batch,
loss, backward, clip, optimizer, EMA: what ``flowspec run`` executes). The methods run interleaved in
one process (rounds of ``--inner`` steps each, order rotated every round); the reported ratio is the
median over rounds of (method ms / flow-matching ms) in the same round, with its interquartile range.
Beside it, the cost model of docs/math.md, "Cost model": (1 - eta) c_D + eta with C = 1.5 and with
C measured here (a jvp's time over a forward's on the same network and batch).

    python -m benchmarks.step_cost                       # CPU default: batch 1024
    python -m benchmarks.step_cost --batch 4096 --device cuda --reps 30 --inner 20   # the paper's target
    python -m benchmarks.step_cost --methods fm,lsd --compile   # train.compile = true (whole loss compiled)
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    METHOD_LABELS,
    compile_method,
    default_out,
    interleaved,
    print_table,
    ratios,
    resolve_device,
    setup_threads,
    summary,
    write_result,
)
from flowspec import engine
from flowspec.jvp import jvp

#: the issue's targets at the paper's 4 x 512 MLP, batch 4096, eta = 0.75 (ratio to a flow-matching step)
TARGETS = {"lsd": 1.45, "esd": 1.45, "esd-none": 1.45, "psd-u": 1.25, "psd-m": 1.25}


def loss_backward(graph):
    """The objective's share of a step: loss and backward only (no optimizer, clipping or EMA)."""
    def run():
        graph.model.zero_grad(set_to_none=True)
        batch = engine.draw_batch(graph, graph.spec.train.batch_size)
        out = graph.objective(graph.model, graph.interpolant, graph.teacher, batch)
        out.loss.backward()
    return run


def count_flops(graph) -> int:
    """FLOPs of the matrix products (linear layers, convolutions, attention) in one loss + backward.
    They depend on the batch size and eta, not on the sampled times or the data."""
    with FlopCounterMode(display=False) as counter:
        loss_backward(graph)()
    return counter.get_total_flops()


def measure_c(graph, device, reps: int, inner: int, warmup: int) -> dict:
    """C: a jvp in t of X_{s,t}(x) over a forward of X, no gradients, same network and batch."""
    b = graph.spec.train.batch_size
    batch = engine.draw_batch(graph, b)
    s = torch.rand(b, device=device) * 0.5
    t = s + 0.5
    model = graph.model

    @torch.no_grad()
    def forward():
        model(s, t, batch.x0)

    @torch.no_grad()
    def tangent():
        jvp(lambda tt: model(s, tt, batch.x0), (t,), (torch.ones_like(t),))

    times = interleaved({"forward": forward, "jvp": tangent}, device, reps, inner, warmup)
    return {"forward_ms": summary(times["forward"]), "jvp_ms": summary(times["jvp"]),
            "C": summary(ratios(times["jvp"], times["forward"]))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--methods", default="fm,lsd,esd,esd-none,psd-u,psd-m")
    p.add_argument("--reps", type=int, default=12, help="interleaved rounds")
    p.add_argument("--inner", type=int, default=3, help="steps per method per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default OMP_NUM_THREADS or 1)")
    p.add_argument("--compile", action="store_true",
                   help="train.compile = true for every method (the step's whole loss compiled, jvps included; "
                        "the loss+bwd column and C stay eager)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    started = time.perf_counter()
    threads = setup_threads(a.threads)
    device = resolve_device(a.device)
    methods = a.methods.split(",")
    if "fm" not in methods:
        methods = ["fm"] + methods
    extra = ["train.compile=true"] if a.compile else []
    graphs = {m: compile_method(m, a.batch, device, a.width, a.depth, extra=extra) for m in methods}
    steps = {m: functools.partial(engine.step, graphs[m]) for m in methods}
    step_times = interleaved(steps, device, a.reps, a.inner, a.warmup)
    lb_times = interleaved({m: loss_backward(graphs[m]) for m in methods}, device, a.reps, a.inner, a.warmup)
    c = measure_c(graphs["fm"], device, a.reps, a.inner, a.warmup)
    c_measured = c["C"]["median"]
    flops = {m: count_flops(graphs[m]) for m in methods}
    results = {"C": c, "methods": {}}
    rows = []
    for m in methods:
        obj = graphs[m].objective
        r = summary(ratios(step_times[m], step_times["fm"]))
        rlb = summary(ratios(lb_times[m], lb_times["fm"]))
        target = TARGETS.get(m)
        results["methods"][m] = {
            "label": METHOD_LABELS[m], "cost_formula": obj.cost_formula() if m != "fm" else "-",
            "eta": obj.options.diagonal_fraction,
            "step_ms": summary(step_times[m]), "ratio": r,
            "loss_backward_ms": summary(lb_times[m]), "loss_backward_ratio": rlb,
            "model_ratio_c1.5": obj.step_cost(1.5), "model_ratio_c_measured": obj.step_cost(c_measured),
            "flops": flops[m], "flop_ratio": flops[m] / flops["fm"],
            "target": target, "meets_target": (r["median"] <= target) if target else None,
        }
        v = results["methods"][m]
        rows.append([v["label"], f"{v['step_ms']['median']:.1f}", f"{r['median']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]",
                     f"{rlb['median']:.3f}", f"{v['flop_ratio']:.3f}", v["cost_formula"],
                     f"{v['model_ratio_c1.5']:.3f}", f"{v['model_ratio_c_measured']:.3f}",
                     f"{target}" if target else "-"])
    config = {"batch": a.batch, "width": a.width, "depth": a.depth, "reps": a.reps, "inner": a.inner,
              "warmup": a.warmup, "threads": threads, "methods": methods, "compile": a.compile}
    out = write_result(a.out or default_out("step_cost", device), "step_cost", device, config, results, started)
    print_table(f"Step cost on {device} ({a.depth} x {a.width} MLP, batch {a.batch}, {threads} thread(s)); "
                f"measured C = {c_measured:.2f}; written to {out}",
                ["method", "ms/step", "ratio to FM [IQR]", "loss+bwd ratio", "FLOP ratio", "c_D", "model C=1.5",
                 "model C=meas", "target"], rows)
    return results


if __name__ == "__main__":
    main()
