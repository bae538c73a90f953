"""Shared pieces of the benchmarks: thread setup, machine description, timing, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flowspec.distributed import resolve_device  # noqa: F401  (re-exported: the benchmarks take flowspec's device names)

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1

#: the paper's checkerboard methods and the spec each one starts from
METHOD_SPECS = {
    "fm": "checkerboard-fm.toml",
    "lsd": "checkerboard-lsd.toml",
    "esd": "checkerboard-esd.toml",
    "psd-u": "checkerboard-psd-u.toml",
    "psd-m": "checkerboard-psd-m.toml",
    "esd-none": "checkerboard-esd.toml",
}
#: variants of a spec: ESD with the gradient through the whole residual, one augmented jvp
#: (the 1 + C of docs/math.md, "Cost model")
METHOD_OVERRIDES = {"esd-none": ['objective.stop_gradient="none"']}
METHOD_LABELS = {"fm": "FM", "lsd": "LSD", "esd": "ESD", "psd-u": "PSD-U", "psd-m": "PSD-M",
                 "esd-none": "ESD, stop_gradient none"}

#: the checkerboard setup minus steps and batch: every method gets it, so the flow-matching baseline
#: shares network, optimizer, clipping and EMA with the flow maps. The network is the paper's as its
#: reference code builds it (docs/networks.md); the recipe is the reference's (lr 1e-3, clip 10, EMA
#: 0.999) except Adam for RAdam and the warm-up EMA, which the ablation in docs/results.md measures
PAPER_SETUP = ["network.width=512", "network.depth=5", 'network.activation="gelu_tanh"',
               'network.time_embedding="raw"', 'network.times="s_t"', 'network.init="lecun_normal"',
               'network.scale="data_std"', 'train.optimizer="adam"', "train.lr=1e-3", 'train.schedule="constant"',
               "train.grad_clip=10.0", "train.ema=0.999", 'train.ema_schedule="warmup"']

#: the same checkerboard setup as flowspec trained it before the paper's network was matched (the
#: "before" of docs/results.md): its old MLP (32 sinusoids of 1000 s and of 1000 (t - s), no
#: preconditioning, 4 hidden layers, PyTorch's init, erf GELU) and the reference's RAdam at 1e-3
BEFORE_SETUP = ["network.width=512", "network.depth=4", 'network.activation="gelu"',
                'network.time_embedding="positional"', 'network.times="s_dt"', 'network.init="torch"',
                "network.scale=1.0", 'train.optimizer="radam"', "train.lr=1e-3", 'train.schedule="constant"',
                "train.grad_clip=10.0", "train.ema=0.999", 'train.ema_schedule="warmup"']
SETUPS = {"paper": PAPER_SETUP, "before": BEFORE_SETUP}


def setup_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (default: OMP_NUM_THREADS, else 1) and return the count."""
    n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Where the numbers came from."""
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "device": str(device)}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def compile_method(method: str, batch: int, device: torch.device, width: int = 512, depth: int = 4,
                   seed: int = 0, extra: Sequence[str] = ()):
    """The TrainingGraph of METHOD_SPECS[method] with the paper's setup, this network and batch."""
    from flowspec import compile_spec, load_spec

    overrides = PAPER_SETUP + [f"network.width={width}", f"network.depth={depth}", f"train.batch_size={batch}",
                               f'train.device="{device.type}"', f"train.seed={seed}",
                               *METHOD_OVERRIDES.get(method, ()), *extra]
    return compile_spec(load_spec(SPECS / METHOD_SPECS[method], overrides=overrides))


def shown(path: Path) -> str:
    """A path as a result file records it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def default_out(name: str, device: torch.device) -> Path:
    return RESULTS / ("gpu" if device.type == "cuda" else "cpu") / f"{name}.json"


def command_line() -> str:
    """The command as a user reruns it (``python -m benchmarks.<name> ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def write_result(path: Path, name: str, device: torch.device, config: dict, results: dict,
                 started: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": SCHEMA, "benchmark": name, "command": command_line(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "wall_seconds": round(time.perf_counter() - started, 1), "machine": machine(device),
              "config": config, "results": results}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block in milliseconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object], repeat: int) -> float:
        """Mean ms per call of ``fn`` over ``repeat`` back-to-back calls."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / repeat
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeat


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, inner: int,
                warmup: int) -> dict[str, list[float]]:
    """ms per call of each function, measured in ``reps`` rounds; within a round every function runs
    ``inner`` times back to back, in an order rotated from round to round, so slow phases of a shared
    machine hit every function alike."""
    timer = Timer(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timer(fns[name], inner))
    return times


def summary(values: Sequence[float]) -> dict:
    """median and the interquartile range (p25, p75) of a list of numbers, plus min and n."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "n": len(v)}


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios a_r / b_r (same round: same machine conditions)."""
    return [x / y for x, y in zip(a, b)]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
