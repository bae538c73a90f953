"""Ablation: what each choice of a shipped spec is worth, one ``--set`` at a time.

Every row is ``flowspec run specs/<spec>.toml`` with the budget below plus that row's overrides (its
one-line ``--set``), trained and evaluated through the public API; the first row is the spec as
shipped. Entries, mean over seeds: for the checkerboard LSD spec, flowspec's ``kl`` (50 x 50
histogram against the exact cell masses) at K = 1, 2, 4, 8, 16 flow-map steps; for the Gaussian LSD
spec, ``flow_map_error`` (squared error against the closed-form map on the (s, t) grid and at (0, 1))
at the spec's own budget, in 4 dimensions.

    python -m benchmarks.ablation --jobs 2                       # checkerboard: 800 steps x 512, 16k samples, 2 seeds
    python -m benchmarks.ablation --spec gaussian-lsd --jobs 2   # the Gaussian spec's 1000 x 512, 2 seeds
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.common import RESULTS, SPECS, print_table, setup_threads, write_result

KS = [1, 2, 4, 8, 16]

#: (row label, what it changes, overrides); each is one line of --set against the shipped spec
CHECKERBOARD: list[tuple[str, str, list[str]]] = [
    ("shipped", "the spec as shipped", []),
    ("embedding: positional", "sinusoids of 1000 s and 1000 (t - s), 32 each (flowspec's old MLP)",
     ['network.time_embedding="positional"', 'network.times="s_dt"']),
    ("embedding: fourier", "random Fourier features of s and t, std 1",
     ['network.time_embedding="fourier"']),
    ("times: (s, t - s)", "raw s and t - s instead of raw s and t", ['network.times="s_dt"']),
    ("no preconditioning", "c = 1: the network sees x and returns v itself", ["network.scale=1.0"]),
    ("depth 4", "4 hidden layers instead of the reference's 5", ["network.depth=4"]),
    ("PyTorch init", "PyTorch's Linear default instead of LeCun-normal with zero biases", ['network.init="torch"']),
    ("exact GELU", "erf GELU instead of the tanh approximation", ['network.activation="gelu"']),
    ("old network", "all of flowspec's old MLP choices at once",
     ['network.time_embedding="positional"', 'network.times="s_dt"', "network.scale=1.0", "network.depth=4",
      'network.init="torch"', 'network.activation="gelu"']),
    ("EMA: plain", "decay 0.999 from the initial weights (the reference)", ['train.ema_schedule="plain"']),
    ("EMA: bias-corrected", "weight (1 - d) / (1 - d^k)", ['train.ema_schedule="bias_corrected"']),
    ("lr: cosine", "cosine decay to 0 over the run", ['train.schedule="cosine"']),
    ("lr: sqrt", "lr / sqrt(max(1, k / 200)) (the reference's rule, scaled to the budget)",
     ['train.schedule="sqrt"', "train.decay_start=200"]),
    ("optimizer: RAdam", "RAdam (the reference's) instead of Adam", ['train.optimizer="radam"']),
    ("reference recipe", "RAdam and the plain EMA: the reference's recipe on the shipped network",
     ['train.optimizer="radam"', 'train.ema_schedule="plain"']),
]

GAUSSIAN: list[tuple[str, str, list[str]]] = [
    ("shipped (4-D)", "the spec as shipped, in 4 dimensions", []),
    ("base scale 1", "x0 ~ N(0, I) instead of the data's std", ["interpolant.base_scale=1.0"]),
    ("c = data std", "preconditioning by the data's std (0.5)", ['network.scale="data_std"']),
    ("width 128", "128 units instead of 256", ["network.width=128"]),
    ("positional embedding", "sinusoids of 1000 s and 1000 (t - s)",
     ['network.time_embedding="positional"', 'network.times="s_dt"']),
    ("PyTorch init", "PyTorch's Linear default", ['network.init="torch"']),
    ("RAdam", "RAdam instead of Adam", ['train.optimizer="radam"']),
    ("constant lr", "no cosine decay", ['train.schedule="constant"']),
    ("lr 1e-3", "the checkerboard's learning rate", ["train.lr=1e-3"]),
    ("EMA: plain", "the reference's plain EMA", ['train.ema_schedule="plain"']),
    ("EMA: bias-corrected", "the bias-corrected EMA", ['train.ema_schedule="bias_corrected"']),
    ("checkerboard recipe", "RAdam at a constant 1e-3, plain EMA",
     ['train.optimizer="radam"', "train.lr=1e-3", 'train.schedule="constant"', 'train.ema_schedule="plain"']),
]

#: spec -> (rows, the budget's extra overrides, columns); the checkerboard's budget comes from the flags
SPECS_ABLATED = {
    "checkerboard-lsd": (CHECKERBOARD, [], [f"K={k}" for k in KS]),
    "gaussian-lsd": (GAUSSIAN, ["data.dim=4", "data.mean=[2.0, -1.0, 0.5, 1.0]", "eval.ode=[]",
                                "eval.steps=[1]", "eval.num_samples=1000"], ["grid", "(0, 1)"]),
}


def budget(spec: str, a, seed: int) -> list[str]:
    common = [f"train.seed={seed}", 'train.device="cpu"', "train.checkpoint_every=0", "train.keep_checkpoints=1",
              "eval.plot=false"]
    if spec == "checkerboard-lsd":
        return common + [f"train.steps={a.steps}", f"train.batch_size={a.batch}", f"eval.num_samples={a.num_samples}",
                         'eval.metrics=["kl"]', "eval.flow_map_error=false", f"eval.steps={KS}", "eval.ode=[]"]
    return common + SPECS_ABLATED[spec][1]


def run_variant(label: str, overrides: list[str], seed: int, a) -> dict:
    """Train one (variant, seed) in a temporary run folder; its values by column."""
    from flowspec import compile_spec, load_spec, train

    setup_threads(1)
    path = SPECS / f"{a.spec}.toml"
    spec = load_spec(path, overrides=budget(a.spec, a, seed) + overrides)
    graph = compile_spec(spec)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(graph, Path(tmp) / "run", console=Console(stderr=True, quiet=True))
        ev = json.loads((Path(tmp) / "run" / "eval.json").read_text())
    if a.spec == "checkerboard-lsd":
        values = {f"K={k}": ev["steps"][str(k)]["kl"] for k in KS}
    else:
        values = {"grid": ev["flow_map_error"]["grid"], "(0, 1)": ev["flow_map_error"]["0-1"]}
    # a variant whose resolved spec equals the shipped one measures nothing: flag it
    shipped = load_spec(path, overrides=budget(a.spec, a, seed)).model_dump()
    return {"label": label, "seed": seed, "overrides": overrides, "seconds": time.perf_counter() - start,
            "same_as_shipped": spec.model_dump() == shipped, "values": values}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", choices=sorted(SPECS_ABLATED), default="checkerboard-lsd")
    p.add_argument("--steps", type=int, default=800, help="checkerboard budget")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=16_000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated row labels (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    p.add_argument("--out", default=None, help="default benchmarks/results/cpu/ablation-<spec>.json")
    a = p.parse_args(argv)
    started = time.perf_counter()
    wanted = set(filter(None, a.only.split(",")))
    rows_of, _, columns = SPECS_ABLATED[a.spec]
    variants = [v for v in rows_of if not wanted or v[0] in wanted]
    jobs = [(label, ov, seed) for label, _, ov in variants for seed in range(a.seeds)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, a.jobs), mp_context=ctx) as pool:
        runs = list(pool.map(run_variant, *zip(*jobs), [a] * len(jobs)))
    rows = {}
    for label, what, ov in variants:
        mine = [r for r in runs if r["label"] == label]
        rows[label] = {"what": what, "set": " ".join(f"--set {o}" for o in ov),
                       "same_as_shipped": mine[0]["same_as_shipped"],
                       "mean": {c: statistics.fmean(r["values"][c] for r in mine) for c in columns},
                       "std": {c: statistics.stdev(r["values"][c] for r in mine) if len(mine) > 1 else 0.0
                               for c in columns}}
    metric = "kl" if a.spec == "checkerboard-lsd" else "flow_map_error"
    budget_ = (f"{a.steps} steps at batch {a.batch}, {a.num_samples} samples" if a.spec == "checkerboard-lsd"
               else "the spec's budget, in 4 dimensions")
    config = {"spec": f"specs/{a.spec}.toml", "metric": metric, "budget": budget_, "columns": columns,
              "seeds": a.seeds, "jobs": a.jobs, "overrides": budget(a.spec, a, 0)}
    out = Path(a.out) if a.out else RESULTS / "cpu" / f"ablation-{a.spec}.json"
    path = write_result(out, "ablation", torch.device("cpu"), config, {"rows": rows, "runs": runs}, started)
    print_table(f"{metric}, mean over {a.seeds} seeds, {budget_}; written to {path}", ["row"] + columns,
                [[label] + [f"{r['mean'][c]:.4g}" for c in columns] for label, r in rows.items()])
    return rows


if __name__ == "__main__":
    main()
