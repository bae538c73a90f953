"""Every check of a validated spec that compiling would make, without allocating the network, the data
or a teacher's weights (``flowspec validate`` runs them; so does :func:`flowspec.compile.compile_spec`
first, so that ``run`` reports every mistake at once too).

The network is built on PyTorch's ``meta`` device (shapes, no storage): its own checks run (a U-Net
on 2-D data) and its parameter count gives the memory a run would ask for, compared with the
machine's before anything is allocated; so are the batch and the evaluation samples (lower bounds).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from flowspec import distributed, runfolder
from flowspec.build import build, dataset_facts
from flowspec.errors import UserError, cut, short
from flowspec.registry import Registry, default_registry
from flowspec.runs import RunFolder
from flowspec.spec.models import TRACKERS

#: bytes per value of each precision's weights and data
ITEM = {"float32": 4, "bf16": 4, "float64": 8}
#: weights, EMA, gradients and two optimizer moments
COPIES = 5
#: values held per sample and data dimension during a step, at the least (x0, x1, x_t, outputs,
#: targets, tangents, gradients)
PER_SAMPLE = 16


def gib(n: float) -> str:
    return f"{n / 2**40:,.1f} TiB" if n >= 2**40 else f"{n / 2**30:,.1f} GiB"


def memory(device: str) -> tuple[int, str] | None:
    """(bytes, what) of the memory a run on ``device`` can use, or None when unknown."""
    try:
        if device in ("cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, "the GPU has"
        if device == "cuda":
            return None
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _largest_option(options) -> tuple[str, Any]:
    """The network option with the largest integer value (the likely cause of a huge network)."""
    ints = [(k, v) for k, v in options.model_dump().items() if isinstance(v, int) and not isinstance(v, bool)]
    return max(ints, key=lambda kv: abs(kv[1]), default=("kind", options.kind))


def check_network(spec, registry: Registry, shape, lines: list[str]) -> None:
    o = spec.train
    try:
        with torch.device("meta"):
            net = build(registry, "networks", spec.network, tuple(shape))
        count = sum(p.numel() for p in net.parameters())
    except UserError as exc:
        lines += exc.lines
        return
    except (RuntimeError, ValueError, OverflowError, MemoryError, TypeError) as exc:
        key, value = _largest_option(spec.network)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        lines.append(f"network.{key}: {short(value)} asks for a network that cannot be built ({cut(first, 120)})")
        return
    need = count * ITEM[o.precision] * COPIES
    have = memory(o.device)
    if have is not None and need > have[0]:
        key, value = _largest_option(spec.network)
        lines.append(f"network.{key}: {short(value)} gives {count:,} parameters, about {gib(need)} for weights, "
                     f"EMA, gradients and optimizer; {have[1]} {gib(have[0])}")


def check_sizes(spec, shape, lines: list[str]) -> None:
    """Batch and evaluation samples against the machine's memory (lower bounds)."""
    o, ev = spec.train, spec.eval
    have = memory(o.device)
    if have is None or shape is None:
        return
    dims = math.prod(shape)
    item = ITEM[o.precision]
    for key, n, per in (("train.batch_size", o.batch_size, PER_SAMPLE), ("eval.num_samples", ev.num_samples, 3),
                        ("eval.flow_map_samples", ev.flow_map_samples, 8)):
        need = n * dims * item * per
        if need > have[0]:
            lines.append(f"{key}: {n:,} samples of shape {tuple(shape)} need at least {gib(need)}; "
                         f"{have[1]} {gib(have[0])}")
    # a K-step grid holds K + 1 float64 times (and the sampler takes K network passes)
    for key, ks in (("eval.steps", ev.steps), ("eval.ode", [row.steps for row in ev.ode])):
        k = max(ks, default=0)
        if 8 * (k + 1) > have[0] // 4:
            lines.append(f"{key}: {k:,} steps need a time grid of {gib(8 * (k + 1))}; {have[1]} {gib(have[0])}")


def check_teacher(path: str, shape, chain: list[Path], lines: list[str]) -> None:
    """A teacher run: a run folder with a checkpoint, not this run, no cycle, the same data shape."""
    try:
        run = RunFolder(path, label="teacher.path: ")
    except UserError as exc:
        lines += exc.lines
        return
    key = run.path.resolve()
    own = runfolder.own_run[0]
    if own is not None and key == Path(own).resolve():
        lines.append(f"teacher.path: {path}: is this run's own folder (a run cannot teach itself)")
        return
    if key in chain:
        cycle = " -> ".join(str(p) for p in chain[chain.index(key):] + [key])
        lines.append(f"teacher.path: {path}: the teacher runs form a cycle ({cycle})")
        return
    if not run.steps():
        lines.append(f"teacher.path: {path}: the run has no checkpoint yet")
    try:
        spec = run.spec
        facts, _ = dataset_facts(spec, default_registry())
    except UserError as exc:
        lines.append(f"teacher.path: {path}: its spec is not valid ({cut(exc.lines[0], 160)})")
        return
    if shape is not None and facts.shape is not None and tuple(facts.shape) != tuple(shape):
        lines.append(f"teacher.path: {path}: the teacher's data shape {tuple(facts.shape)} differs from "
                     f"this spec's {tuple(shape)}")
    t = spec.teacher
    if t is not None and t.kind == "run":
        check_teacher(t.run_folder, facts.shape, chain + [key], lines)


def check_metrics(spec, registry: Registry, dataset, real: bool, lines: list[str]) -> None:
    ev = spec.eval
    for name in ev.metric_options:
        if name not in ev.metrics:
            lines.append(f"eval.metric_options.{cut(name, 40)}: {cut(name, 40)} is not in eval.metrics "
                         f"(valid: {', '.join(ev.metrics) or 'none listed'})")
    for name in ev.metrics:
        cls = registry.get("metrics", name)
        try:
            metric = cls(cls.Options(**ev.metric_options.get(name, {})))
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                key = ".".join(str(p) for p in e["loc"])
                got = f" (got {short(e['input'])})" if e["type"] != "extra_forbidden" else ""
                msg = (e["msg"][0].lower() + e["msg"][1:]).replace("input should be", "must be")
                lines.append(f"eval.metric_options.{name}.{cut(key, 40)}: {msg}{got} "
                             f"(valid keys: {', '.join(cls.Options.model_fields) or 'none'})")
            continue
        check = getattr(metric, "check", None)
        if check is None and not real or dataset.shape is None:
            continue
        try:
            if check is not None:
                check(dataset)
            else:
                metric(dataset.sample(16, torch.Generator().manual_seed(0)), dataset, torch.Generator().manual_seed(0))
        except ValueError as exc:  # MetricUnavailable
            lines.append(f"eval.metrics: {exc}")


#: the largest data scale whose squares (losses, energies, variances) stay finite in float32
MAX_SCALE = 1e15


def check_scale(spec, dataset, lines: list[str]) -> None:
    """Data so large that float32 arithmetic on it overflows (a loss is a sum of squares)."""
    try:
        scale = float(dataset.std().abs().max())
    except (RuntimeError, ValueError, NotImplementedError):
        return
    if not math.isfinite(scale) or scale > MAX_SCALE:
        key = next((k for k in ("scale", "std", "mean") if k in type(spec.data).model_fields), "kind")
        lines.append(f"data.{key}: the data's standard deviation is {scale:.3g}; losses (sums of squares) "
                     f"overflow float32 beyond {MAX_SCALE:.0e} (rescale the data)")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported: no library's start-up cost)."""
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_log(spec, lines: list[str]) -> None:
    """Each tracker of ``log.backends`` needs its library: one line naming the extra that installs it."""
    for backend in spec.log.backends:
        module = TRACKERS[backend]
        if module is not None and not installed(module):
            lines.append(f"log.backends: \"{backend}\" needs the {backend} extra: pip install 'flowspec[{backend}]'")


def check_spec(spec, registry: Registry | None = None) -> list[str]:
    """Every mistake compiling ``spec`` would meet, one line each (``dotted.key: what is wrong``),
    found without allocating the network, the data or a teacher's weights."""
    from flowspec.data.analytic import exact_velocity

    registry = registry or default_registry()
    lines: list[str] = []
    check_log(spec, lines)
    try:
        distributed.resolve_device(spec.train.device)
    except UserError as exc:
        lines += exc.lines
    try:
        dataset, real = dataset_facts(spec, registry)
    except UserError as exc:
        return lines + exc.lines
    shape = dataset.shape
    if real:
        check_scale(spec, dataset, lines)
    try:
        objective = build(registry, "objectives", spec.objective)
        target = objective.options.target
    except ValueError as exc:
        lines.append(f"objective.target: {exc}")
        target = None
    interpolant = build(registry, "interpolants", spec.interpolant)
    exact = exact_velocity(dataset, interpolant, 1.0) is not None
    t = spec.teacher
    if target == "teacher" and t is None:
        lines.append('objective.target: "teacher" needs a [teacher] section '
                     '(kind = "analytic", or kind = "run" with path = "RUN_FOLDER")')
    if t is not None and t.kind == "analytic" and not exact:
        lines.append(f'teacher.kind: "analytic" needs a dataset with a closed-form velocity; '
                     f'{spec.data.kind} has none (valid: gaussian, gmm, eight_gaussians, checkerboard)')
    if t is not None and t.kind == "run":
        check_teacher(t.run_folder, shape, [], lines)
    for row in spec.eval.ode:
        if row.velocity == "teacher" and t is None:
            lines.append(f'eval.ode: {row.label()}: velocity = "teacher" needs a [teacher] section')
        if row.velocity == "exact" and not exact:
            lines.append(f'eval.ode: {row.label()}: velocity = "exact" needs a dataset with a '
                         f'closed-form velocity; {spec.data.kind} has none')
    o = spec.train
    if o.batch_size % o.grad_accum:
        lines.append(f"train.grad_accum: {o.grad_accum} micro-batches do not split train.batch_size = {o.batch_size} "
                     f"evenly (valid: a divisor of {o.batch_size})")
    if shape is not None:
        check_network(spec, registry, shape, lines)
        check_sizes(spec, shape, lines)
    check_metrics(spec, registry, dataset, real, lines)
    return list(dict.fromkeys(lines))
