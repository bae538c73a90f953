"""Sampling: samples per second of 1-, 2- and 4-step flow maps against the dopri5 baseline (the
flow-matching velocity) at matched quality.

Uses the seed-0 runs the quality benchmark left in ``benchmarks/results/<cpu|gpu>/runs/quality``
(an LSD flow map and the flow-matching baseline trained on the same budget; run the quality
benchmark first, or pass ``--train-steps`` to train both here). Every sampler draws the same
``--num-samples`` base points in one batch; the time is the median of ``--reps`` repetitions
(throughput = samples / median seconds). dopri5 runs at several tolerances; "matched" is the
loosest tolerance whose KL is at most the flow map's (the cheapest dopri5 at least as good), or the
best dopri5 row when none reaches it (marked).

    python -m benchmarks.sampling
    python -m benchmarks.sampling --device cuda --num-samples 64000
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, print_table, resolve_device, setup_threads, shown, synchronize, write_result
from flowspec import checkpoint, compile_spec, load_spec
from flowspec.evaluate import base_samples
from flowspec.evaluate import sample as flow_map_sample
from flowspec.ode import ODEOptions
from flowspec.ode import sample as ode_sample

#: dopri5 tolerances (1e-5 adds minutes on a CPU: about 500 NFE on the default runs)
TOLS = "1e-1,1e-2,1e-3,1e-4"


def restore_run(run_dir: Path, device: torch.device):
    spec = load_spec(run_dir / "spec.toml", overrides=[f'train.device="{device.type}"'])
    graph = compile_spec(spec)
    checkpoint.restore(graph, checkpoint.latest(run_dir))
    return graph


def timed(fn, device, reps: int):
    out, times = None, []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lsd", help="the flow map (a quality run: lsd, esd, psd-u, psd-m)")
    p.add_argument("--runs", default=None, help="folder of quality runs (default results/<dev>/runs/quality)")
    p.add_argument("--train-steps", type=int, default=0, help="train the two runs here with this budget")
    p.add_argument("--num-samples", type=int, default=16_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tols", default=TOLS, help="dopri5 rtol = atol values, comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    started = time.perf_counter()
    threads = setup_threads(a.threads)
    device = resolve_device(a.device)
    sub = "gpu" if device.type == "cuda" else "cpu"
    runs = Path(a.runs) if a.runs else RESULTS / sub / "runs" / "quality"
    if a.train_steps:
        from benchmarks import quality

        q = argparse.Namespace(steps=a.train_steps, batch=512, num_samples=min(a.num_samples, 4000),
                               dopri_tol=1e-4)
        runs = RESULTS / sub / "runs" / "sampling"
        for m in (a.method, "fm"):
            quality.run_one(m, 0, q, device, runs)
    fmap, fm = restore_run(runs / f"{a.method}-seed0", device), restore_run(runs / "fm-seed0", device)
    kl = fmap.metrics["kl"]
    x0 = base_samples(fmap, a.num_samples, fmap.spec.eval.seed)
    n = x0.shape[0]

    def quality_of(x):
        return float(kl(x, fmap.dataset, torch.Generator().manual_seed(1)))

    rows = {}
    model = fmap.sampler()
    for k in (1, 2, 4):
        flow_map_sample(model, x0[:256], k)  # warm-up
        x, sec, times = timed(functools.partial(flow_map_sample, model, x0, k), device, a.reps)
        rows[f"K-{k}"] = {"kind": "flow map", "nfe": k, "kl": quality_of(x), "seconds": sec,
                          "samples_per_second": n / sec, "rep_seconds": times}
    velocity = fm.sampler().velocity
    fm.sampler().eval()
    tols = [float(x) for x in a.tols.split(",")]
    for tol in tols:
        opts = ODEOptions(solver="dopri5", rtol=tol, atol=tol)
        (x, nfe, _), sec, times = timed(functools.partial(ode_sample, velocity, x0, opts), device, a.reps)
        rows[f"dopri5-{tol:g}"] = {"kind": "dopri5", "tol": tol, "nfe": nfe, "kl": quality_of(x), "seconds": sec,
                                   "samples_per_second": n / sec, "rep_seconds": times}
    dopri = [r for r in rows.values() if r["kind"] == "dopri5"]
    matched = {}
    for k in (1, 2, 4):
        mine = rows[f"K-{k}"]
        ok = [r for r in dopri if r["kl"] <= mine["kl"]]
        pick = max(ok, key=lambda r: r["tol"]) if ok else min(dopri, key=lambda r: r["kl"])
        matched[f"K-{k}"] = {"dopri5_tol": pick["tol"], "dopri5_nfe": pick["nfe"], "dopri5_kl": pick["kl"],
                             "reached": bool(ok), "speedup": mine["samples_per_second"] / pick["samples_per_second"]}
    config = {"method": a.method, "runs": shown(runs), "num_samples": n, "reps": a.reps, "threads": threads,
              "tols": tols, "train_steps_of_runs": fmap.spec.train.steps, "batch_of_runs": fmap.spec.train.batch_size}
    results = {"rows": rows, "matched": matched}
    out = write_result(a.out or RESULTS / sub / "sampling.json", "sampling", device, config, results, started)
    table = []
    for name, r in rows.items():
        m = matched.get(name)
        table.append([name if r["kind"] == "flow map" else f"FM dopri5 tol={r['tol']:g}", r["nfe"], f"{r['kl']:.4f}",
                      f"{r['samples_per_second']:.0f}",
                      (f"tol={m['dopri5_tol']:g}{'' if m['reached'] else ' (best; not reached)'}: "
                       f"{m['speedup']:.1f}x") if m else ""])
    print_table(f"Sampling on {device}: {a.method.upper()} flow map vs FM dopri5, {n} samples per call, "
                f"{threads} thread(s); written to {out}",
                ["sampler", "NFE", "KL", "samples/s", "vs matched dopri5"], table)
    return results


if __name__ == "__main__":
    main()
