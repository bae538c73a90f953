"""Quality: the paper's checkerboard protocol (docs/math.md, "Table 1: checkerboard") for LSD, ESD,
PSD-U, PSD-M and a flow-matching baseline trained on the same budget, over several seeds.

Each run is ``flowspec run specs/checkerboard-<method>.toml`` with the overrides printed in the JSON
(the paper's 4 x 512 GELU MLP, RAdam 1e-3, clip 10, EMA 0.999 for every method, the budget below),
through the public API (load_spec, compile_spec, train). Flow maps are sampled with K = 1, 2, 4, 8, 16
steps (NFE = K); the flow-matching baseline with Euler at the same K and dopri5 (NFE counted). Metrics:
KL of a 50 x 50 histogram against the exact cell masses, and energy distance. The KL of as many exact
data samples is reported as the estimator's floor at that sample count. Samples are saved per run
(one ``quality-samples.npz`` beside the JSON, arrays named ``<method>-seed<k>/<row>``) so
``python -m benchmarks.verify`` can recompute the KL.

    python -m benchmarks.quality                         # default: 2 seeds x 5 methods, 400 steps, batch 512
    python -m benchmarks.quality --protocol paper-cpu --jobs 2   # 3000 steps x 4096, 64k samples, LSD 2 seeds
    python -m benchmarks.quality --full --device cuda    # the paper's budget: 150k steps, batch 100k, 64k samples

``--jobs N`` trains N runs at a time in separate processes of one thread each (quality does not
depend on timing; each run's ``train_seconds`` does, so compare those only between runs of one ``--jobs``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from benchmarks.common import (
    METHOD_LABELS,
    METHOD_OVERRIDES,
    METHOD_SPECS,
    RESULTS,
    SETUPS,
    SPECS,
    print_table,
    resolve_device,
    setup_threads,
    shown,
    write_result,
)
from flowspec import compile_spec, load_spec, train

KS = [1, 2, 4, 8, 16]
METRICS = ["kl", "energy"]


def overrides(method: str, seed: int, steps: int, batch: int, num_samples: int, device: torch.device,
              dopri_tol: float, setup: str = "paper") -> list[str]:
    o = SETUPS[setup] + [f"train.steps={steps}", f"train.batch_size={batch}", f"train.seed={seed}",
                       f'train.device="{device.type}"', "train.checkpoint_every=0", "train.keep_checkpoints=1",
                       f"train.log_every={max(1, min(50, steps))}", f"eval.num_samples={num_samples}",
                       'eval.metrics=["kl", "energy"]', "eval.plot=false", "eval.flow_map_error=false",
                       *METHOD_OVERRIDES.get(method, ())]
    if method == "fm":
        # the baseline: the learned velocity v_{t,t} integrated by Euler with K steps and by dopri5;
        # its flow-map head (v_{s,t} off the diagonal) is untrained, so only K = 1 is evaluated and dropped
        ode = ", ".join([f'{{solver = "euler", steps = {k}}}' for k in KS]
                        + [f'{{solver = "dopri5", rtol = {dopri_tol:g}, atol = {dopri_tol:g}}}'])
        o += ["eval.steps=[1]", f"eval.ode=[{ode}]"]
    else:
        o += [f"eval.steps={KS}", "eval.ode=[]"]
    return o


#: named protocols: budgets a result in docs/results.md is quoted at
PROTOCOLS = {
    # the paper's checkerboard at a CPU budget (one thread: about 15 minutes a run)
    "paper-cpu": {"steps": 3000, "batch": 4096, "num_samples": 64_000, "seeds": 1, "method_seeds": "lsd=2",
                  "dopri_tol": 1e-4},
}


def parse_method_seeds(text: str) -> dict[str, int]:
    """"lsd=2,esd=1" -> {"lsd": 2, "esd": 1}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.partition("=")
        out[name.strip()] = int(n)
    return out


def _job(method: str, seed: int, a, device: str, run_root: Path) -> tuple[dict, dict]:
    """One (method, seed) in a worker process of one thread: its record and its samples."""
    setup_threads(1)
    samples: dict = {}
    return run_one(method, seed, a, torch.device(device), run_root, samples), samples


def run_all(jobs: list[tuple[str, int]], a, device: torch.device, run_root: Path, samples: dict) -> list[dict]:
    """Every (method, seed), ``a.jobs`` at a time; records in the order of ``jobs``."""
    if a.jobs <= 1:
        runs = []
        for method, seed in jobs:
            runs.append(run_one(method, seed, a, device, run_root, samples))
            print(f"quality: {method} seed {seed}: trained in {runs[-1]['train_seconds']:.0f} s", flush=True)
        return runs
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_job, m, k, a, str(device), run_root): (m, k) for m, k in jobs}
        done = {}
        for f in concurrent.futures.as_completed(futures):
            record, arrays = f.result()
            done[futures[f]] = record
            samples.update(arrays)
            print(f"quality: {record['method']} seed {record['seed']}: trained in {record['train_seconds']:.0f} s",
                  flush=True)
    return [done[j] for j in jobs]


def run_one(method: str, seed: int, a, device: torch.device, run_root: Path, samples: dict | None = None) -> dict:
    """Train and evaluate one (method, seed); its samples go into ``samples`` as "<method>-seed<k>/<row>"."""
    ov = overrides(method, seed, a.steps, a.batch, a.num_samples, device, a.dopri_tol, a.setup)
    spec = load_spec(SPECS / METHOD_SPECS[method], overrides=ov)
    graph = compile_spec(spec)
    run_dir = run_root / f"{method}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    train(graph, run_dir, console=Console(stderr=True, quiet=True))
    seconds = time.perf_counter() - start
    ev = json.loads((run_dir / "eval.json").read_text())
    rows, arrays = {}, {}
    if method == "fm":
        for label, row in ev.get("ode", {}).items():
            if "error" in row:
                rows[label] = {"error": row["error"]}
                continue
            key = label.replace("euler K=", "euler-").replace("dopri5 tol=", "dopri5-")
            rows[key] = {m: row[m] for m in METRICS} | {"nfe": row["nfe"], "seconds": row["seconds"]}
            stem = label.replace(" ", "-").replace("/", "_").replace("=", "")
            arrays[key] = np.load(run_dir / "samples" / f"{stem}.npy")
    else:
        for k in KS:
            row = ev["steps"][str(k)]
            rows[f"K-{k}"] = {m: row[m] for m in METRICS} | {"nfe": k, "seconds": row["seconds"]}
            arrays[f"K-{k}"] = np.load(run_dir / "samples" / f"steps-{k}.npy")
    if samples is not None:
        samples.update({f"{method}-seed{seed}/{row}": x for row, x in arrays.items()})
    # the estimator's floor: exact data samples of the same count, same metric
    g = torch.Generator().manual_seed(10_000 + seed)
    data = graph.dataset.sample(a.num_samples, g)
    floor = {m: float(graph.metrics[m](data, graph.dataset, torch.Generator().manual_seed(1))) for m in METRICS}
    return {"method": method, "seed": seed, "overrides": ov, "train_seconds": seconds, "rows": rows,
            "data_floor": floor}


def aggregate(runs: list[dict]) -> dict:
    """mean, sample std, min, max over seeds of every (method, row, metric)."""
    table: dict = {}
    for r in runs:
        for row, vals in r["rows"].items():
            for name, v in vals.items():
                if name in ("seconds", "error"):
                    continue
                table.setdefault(r["method"], {}).setdefault(row, {}).setdefault(name, []).append(v)
    out: dict = {}
    for method, rows in table.items():
        for row, metrics in rows.items():
            for name, vs in metrics.items():
                out.setdefault(method, {}).setdefault(row, {})[name] = {
                    "mean": statistics.fmean(vs), "std": statistics.stdev(vs) if len(vs) > 1 else 0.0,
                    "min": min(vs), "max": max(vs), "n": len(vs)}
    floors = [r["data_floor"]["kl"] for r in runs]
    out["data"] = {"floor": {"kl": {"mean": statistics.fmean(floors), "n": len(floors)}}}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lsd,esd,psd-u,psd-m,fm")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=16_000)
    p.add_argument("--dopri-tol", type=float, default=1e-4, help="rtol = atol of the dopri5 baseline")
    p.add_argument("--method-seeds", default="", help='seeds of single methods, e.g. "lsd=2" (others: --seeds)')
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="a named budget: sets steps, batch, num-samples, seeds, method-seeds and dopri-tol, "
                   "whatever those flags say")
    p.add_argument("--setup", choices=sorted(SETUPS), default="paper",
                   help="network and recipe: the paper's (default), or flowspec's before it matched them")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, one thread each")
    p.add_argument("--full", action="store_true",
                   help="the paper's budget: 150k steps, batch 100k, 64k eval samples, 3 seeds (a GPU job)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/<cpu|gpu>/quality.json); "
                   "the samples go beside it as <stem>-samples.npz")
    p.add_argument("--runs-dir", default=None, help="run folders (default: runs/quality beside the JSON, git-ignored)")
    a = p.parse_args(argv)
    if a.protocol:
        for key, value in PROTOCOLS[a.protocol].items():
            setattr(a, key, value)
    if a.full:
        a.steps, a.batch, a.num_samples, a.seeds = 150_000, 100_000, 64_000, max(a.seeds, 3)
    methods = a.methods.split(",")
    method_seeds = {m: parse_method_seeds(a.method_seeds).get(m, a.seeds) for m in methods}
    started = time.perf_counter()
    threads = setup_threads(a.threads)
    device = resolve_device(a.device)
    out = Path(a.out) if a.out else RESULTS / ("gpu" if device.type == "cuda" else "cpu") / "quality.json"
    run_root = Path(a.runs_dir) if a.runs_dir else out.parent / "runs" / out.stem
    samples_path = out.with_name(out.stem + "-samples.npz")
    samples: dict = {}
    jobs = [(m, k) for k in range(max(method_seeds.values())) for m in methods if k < method_seeds[m]]
    runs = run_all(jobs, a, device, run_root, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(samples_path, **samples)
    agg = aggregate(runs)
    config = {"setup": SETUPS[a.setup], "setup_name": a.setup, "methods": methods, "seeds": max(method_seeds.values()),
              "method_seeds": method_seeds,
              "protocol": a.protocol, "jobs": a.jobs, "steps": a.steps, "batch": a.batch,
              "num_samples": a.num_samples, "dopri_tol": a.dopri_tol, "full": a.full, "threads": threads,
              "ks": KS, "metrics": METRICS, "samples": samples_path.name, "runs_dir": shown(run_root)}
    path = write_result(out, "quality", device, config, {"runs": runs, "aggregate": agg}, started)
    header = ["method"] + [f"K={k}" for k in KS] + ["dopri5 (NFE)"]
    rows = []
    for m in methods:
        if m == "fm":
            cells = [fmt(agg[m].get(f"euler-{k}")) for k in KS]
            d = next((v for k, v in agg[m].items() if k.startswith("dopri5")), None)
            cells.append(f"{fmt(d)} ({d['nfe']['mean']:.0f})" if d else "-")
            rows.append(["FM (Euler)"] + cells)
        else:
            rows.append([METHOD_LABELS[m]] + [fmt(agg[m].get(f"K-{k}")) for k in KS] + ["-"])
    print_table(f"KL (mean +- std over seeds {method_seeds}), {a.steps} steps at batch {a.batch}, "
                f"{a.num_samples} samples; data floor {agg['data']['floor']['kl']['mean']:.4f}; written to {path}",
                header, rows)
    return {"runs": runs, "aggregate": agg}


def fmt(cell) -> str:
    if not cell or "kl" not in cell:
        return "-"
    return f"{cell['kl']['mean']:.4f}+-{cell['kl']['std']:.4f}"


if __name__ == "__main__":
    main()
