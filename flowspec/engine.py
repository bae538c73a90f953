"""One optimizer step and the state it acts on (docs/design.md, "train"): the TrainingGraph (plain data,
built by flowspec.compile), the EMA, the learning-rate schedule, the non-finite policy, and the
split of a step's batch over processes and micro-batches (flowspec.distributed: the streams;
flowspec.parallel: DDP and FSDP2 around the loss).

    batch of B (every rank the same) -> the rank's N chunks -> loss module (DDP / FSDP2 when W > 1)
          -> backward each (gradients averaged by the engine) -> clip -> optimizer step (skipped on
          every rank when non-finite on any) -> schedule -> EMA
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from flowspec import distributed, parallel
from flowspec.build import DTYPES
from flowspec.data.base import Dataset
from flowspec.flowmap import FlowMap
from flowspec.interpolants import GaussianBase, Interpolant
from flowspec.objectives.base import Batch, LossOutput, Objective, Teacher
from flowspec.spec.models import SpecView, TrainOptions


def lr_factor(o: TrainOptions, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup_steps``, then constant, cosine to 0 over ``steps``, or 1 / sqrt(k / decay_start)."""
    k = step + 1
    warm = min(1.0, k / o.warmup_steps) if o.warmup_steps else 1.0
    if o.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, o.steps) / o.steps))
    elif o.schedule == "sqrt":
        decay = 1 / math.sqrt(max(1.0, k / o.decay_start))
    else:
        decay = 1.0
    return warm * decay


M = TypeVar("M", bound=torch.nn.Module)


class EMA(Generic[M]):
    """Exponential moving average of a module's parameters (buffers are copied), theta_ema <-
    theta_ema + w_k (theta - theta_ema) at the k-th update (k = 1, 2, ...), w_k = 1 - d_k:

    * "plain": d_k = decay, started from the initial weights (the reference code's EMA);
    * "warmup": d_k = min(decay, (1 + k) / (10 + k)), so a short run's average forgets the init;
    * "bias_corrected": w_k = (1 - decay) / (1 - decay^k), Adam's bias correction: the average
      of the iterates weighted by decay^(k - j) and normalised, exactly (the init gets weight 0).
    """

    def __init__(self, model: M, decay: float, schedule: str = "warmup"):
        self.decay, self.schedule = decay, schedule
        self.model: M = copy.deepcopy(model).requires_grad_(False).eval()
        self.updates = 0

    def weight(self, k: int) -> float:
        """w_k, the weight of the current parameters at the k-th update."""
        d = self.decay
        if self.schedule == "warmup":
            return 1 - min(d, (1 + k) / (10 + k))
        if self.schedule == "bias_corrected":
            return (1 - d) / (1 - d**k) if d > 0 else 1.0
        return 1 - d

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One update from ``model``'s parameters (all-gathered when FSDP shards them)."""
        self.updates += 1
        w = self.weight(self.updates)
        params = parallel.full_parameters(model) if isinstance(model, FlowMap) else model.parameters()
        for e, p in zip(self.model.parameters(), params):
            e.lerp_(p.detach(), w)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


@dataclass
class TrainingGraph:
    """Everything a run needs, as objects (flowspec.compile builds it; :func:`step` advances it)."""

    spec: SpecView
    dataset: Dataset
    interpolant: Interpolant
    base: GaussianBase
    model: FlowMap
    ema: EMA[FlowMap]
    objective: Objective
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    metrics: dict[str, Any]
    device: torch.device
    data_generator: torch.Generator
    generator: torch.Generator
    step_count: int = 0
    #: the dataset's closed-form velocity (flowspec.data.analytic), or None
    exact: Any = None
    #: the [teacher] velocity, or None without a [teacher] section
    frozen_teacher: Any = None
    last_grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    last_fault: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    #: this process's place in a data-parallel run (flowspec.distributed); one process by default
    dist: distributed.Context = field(default_factory=distributed.Context)
    #: the teacher run and checkpoint digest this graph distills from (flowspec.teachers), or None
    teacher_pin: dict | None = None
    #: values computed once per graph (the true flow map's endpoints of flowspec.evaluate)
    cache: dict[str, Any] = field(default_factory=dict)
    #: what a step calls on each chunk (flowspec.parallel.wrap: DDP around the loss, or FSDP2
    #: inside); None: the plain loss module of ``model``
    loss_module: torch.nn.Module | None = None
    #: several processes: this rank's own stream for random numbers drawn during its loss (a
    #: residual's, dropout's); None with one process, which draws them from ``generator``
    local_generator: torch.Generator | None = None
    #: False once a step drew random numbers during its loss: its result then depends on how the
    #: batch was split, and a checkpoint refuses another process count (flowspec.checkpoint)
    split_free: bool = True

    def __post_init__(self) -> None:
        if self.loss_module is None:
            self.loss_module = parallel.LossModule(self.model, self.objective, self.interpolant, self.teacher)

    @property
    def local_batch_size(self) -> int:
        """B / W: the samples this process computes per step (in ``train.grad_accum`` chunks)."""
        return self.spec.train.batch_size // self.dist.world_size

    def sampler(self) -> FlowMap:
        """The weights used for sampling and evaluation: the EMA."""
        return self.ema.model

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def draw_batch(graph: TrainingGraph, n: int) -> Batch:
    """x1 from the data stream (CPU generator), x0 from the base (device generator), on the device.
    The graph owns both generators: two graphs never share random numbers."""
    x1 = graph.dataset.sample(n, graph.data_generator).to(graph.device, DTYPES[graph.spec.train.precision])
    x0 = graph.base.sample(n, tuple(x1.shape[1:]), device=graph.device, dtype=x1.dtype, generator=graph.generator)
    return Batch(x0=x0, x1=x1, generator=graph.generator)


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of ``parts`` consecutive pieces of range(n), the first n % parts one longer."""
    q, r = divmod(n, parts)
    edges = [0]
    for k in range(parts):
        edges.append(edges[-1] + q + (k < r))
    return list(zip(edges[:-1], edges[1:]))


def split(batch: Batch, s: torch.Tensor, t: torch.Tensor, n_diag: int, parts: int,
          generator: torch.Generator | None, which: range | None = None
          ) -> list[tuple[Batch, torch.Tensor, torch.Tensor, int]]:
    """A batch of n samples (the first n_diag diagonal) in ``parts`` chunks (batch, s, t, n_diag) of
    n / parts samples, those numbered in ``which`` (default: all): chunk c takes the c-th piece of
    the diagonal samples and the c-th from last of the others, so each holds its share of both (to
    one sample) and every chunk the same count. One part is the batch itself."""
    if parts == 1:
        return [(Batch(batch.x0, batch.x1, generator), s, t, n_diag)]
    n = batch.x0.shape[0]
    diagonal, other = _bounds(n_diag, parts), _bounds(n - n_diag, parts)[::-1]
    out = []
    for k in which if which is not None else range(parts):
        (a, b), (c, d) = diagonal[k], other[k]

        def pick(x: torch.Tensor, a: int = a, b: int = b, c: int = c, d: int = d) -> torch.Tensor:
            return torch.cat([x[a:b], x[n_diag + c:n_diag + d]])

        out.append((Batch(pick(batch.x0), pick(batch.x1), generator), pick(s), pick(t), b - a))
    return out


def _marks(graph: TrainingGraph, generator: torch.Generator) -> list[torch.Tensor]:
    """The states of the generators a loss may draw from: the batch's, torch's global ones."""
    marks = [generator.get_state(), torch.default_generator.get_state()]
    if graph.device.type == "cuda":
        marks.append(torch.cuda.default_generators[graph.device.index or 0].get_state())
    return marks


def _mean(outs: list[LossOutput]) -> LossOutput:
    """The micro-batches' losses as one: the sum of the (1 / N)-scaled losses, and each logged
    term's mean over the micro-batches that log it (detached)."""
    loss = sum((o.loss.detach() for o in outs), outs[0].loss.new_zeros(())) / len(outs)
    names = dict.fromkeys(k for o in outs for k in o.logs)
    logs = {k: torch.stack([torch.as_tensor(o.logs[k]) for o in outs if k in o.logs]).mean() for k in names}
    logs["loss"] = loss
    return LossOutput(loss=loss, logs=logs)


def backward(graph: TrainingGraph) -> LossOutput:
    """The step's batch drawn (x1, x0, then the times), this rank's chunks' losses and their
    backward passes (the engine averages the gradients over the ranks, DDP's buckets after the last
    chunk's); returns this rank's loss on its B / W samples."""
    o = graph.spec.train
    world, n = graph.dist.world_size, o.grad_accum
    generator = graph.local_generator if graph.local_generator is not None else graph.generator
    autocast = torch.autocast(graph.device.type, dtype=torch.bfloat16, enabled=o.precision == "bf16")
    with autocast:
        batch = draw_batch(graph, o.batch_size)
        s, t, n_diag = graph.objective.sample_times(o.batch_size, batch.x0.device, batch.x0.dtype, graph.generator)
    marks = _marks(graph, generator) if graph.split_free else None
    mine = split(batch, s, t, n_diag, world * n, generator, range(graph.dist.rank * n, (graph.dist.rank + 1) * n))
    module = graph.loss_module
    assert module is not None
    outs = []
    for j, (chunk, cs, ct, nd) in enumerate(mine):
        with parallel.no_sync(module) if j < n - 1 else contextlib.nullcontext():
            with autocast:
                out = module(chunk, cs, ct, nd)
            loss = out.loss.float()
            (loss / n if n > 1 else loss).backward()
        outs.append(out)
    if marks is not None and any(not torch.equal(a, b) for a, b in zip(marks, _marks(graph, generator))):
        graph.split_free = False
    return outs[0] if n == 1 else _mean(outs)


def nonfinite_term(out: LossOutput, grad_norm: torch.Tensor, ctx: distributed.Context | None = None) -> str | None:
    """None when the loss and the gradient norm are finite; else the name of the first non-finite
    logged term (e.g. ``diagonal`` or ``distill``), ``loss``, or ``gradient``; with several
    processes (``ctx``) on every rank when on any, as ``rank K`` on a rank whose own loss is finite.

    One ``isfinite`` reduction per step (a device sync on GPU; free on the CPU), its flag reduced
    over the ranks (the same sync)."""
    finite = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
    if ctx is not None and ctx.enabled:
        flag = distributed.max_flag((~finite).float() * (ctx.rank + 1), grad_norm.device)
        worst = int(flag.item())
        if worst == 0:
            return None
        if bool(finite):
            return f"rank {worst - 1}"
    elif bool(finite):
        return None
    for name, value in out.logs.items():
        if name != "loss" and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            return name
    return "loss" if not bool(torch.isfinite(out.loss.detach())) else "gradient"


def step(graph: TrainingGraph) -> LossOutput:
    """One optimizer step: loss and backward (gradients averaged over the ranks), clip, update,
    schedule, EMA.

    A non-finite loss or gradient norm (on any rank) skips the update and the EMA (the schedule and
    the step counter still advance) and names the faulty term in ``graph.last_fault``."""
    o = graph.spec.train
    model = graph.model
    model.train()
    graph.optimizer.zero_grad(set_to_none=True)
    out = backward(graph)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
    graph.last_grad_norm = parallel.replicated(norm) if parallel.sharded(model) else norm
    graph.last_fault = nonfinite_term(out, graph.last_grad_norm, graph.dist)
    if graph.last_fault is None:
        graph.optimizer.step()
        graph.scheduler.step()
        graph.ema.update(model)
    else:  # a non-finite loss or gradient never reaches the weights, the optimizer or the EMA
        graph.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule keeps its pace ("scheduler before optimizer")
            warnings.simplefilter("ignore", UserWarning)
            graph.scheduler.step()
    graph.step_count += 1
    return out


def seed_globals(seed: int) -> None:
    """Seed torch's, numpy's and python's global generators, which components may draw from while
    training (dropout, for one): called when a run starts, not when it is compiled."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
