"""One optimizer step and the state it acts on (docs/design.md, "train"): the TrainingGraph (plain data,
built by flowspec.compile), the EMA, the learning-rate schedule, the non-finite policy and the
gradient synchronisation of a data-parallel run.

    batch -> objective(flow map, interpolant, teacher, batch) -> backward -> all-reduce (W > 1)
          -> clip -> optimizer step (skipped when non-finite) -> schedule -> EMA
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from flowspec import distributed
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
        self.updates += 1
        w = self.weight(self.updates)
        for e, p in zip(self.model.parameters(), model.parameters()):
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

    @property
    def local_batch_size(self) -> int:
        """B / W: the samples this process draws per step."""
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


def nonfinite_term(out: LossOutput, grad_norm: torch.Tensor) -> str | None:
    """None when the loss and the gradient norm are finite; else the name of the first non-finite
    logged term (e.g. ``diagonal`` or ``distill``), ``loss``, or ``gradient``.

    One ``isfinite`` reduction per step (a device sync on GPU; free on the CPU)."""
    if bool(torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)):
        return None
    for name, value in out.logs.items():
        if name != "loss" and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            return name
    return "loss" if not bool(torch.isfinite(out.loss.detach())) else "gradient"


def step(graph: TrainingGraph) -> LossOutput:
    """One optimizer step: loss, backward, gradient average over the ranks, clip, update, schedule, EMA.

    A non-finite loss or gradient norm skips the update and the EMA (the schedule and the step
    counter still advance) and names the faulty term in ``graph.last_fault``."""
    o = graph.spec.train
    model = graph.model
    model.train()
    graph.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(graph.device.type, dtype=torch.bfloat16, enabled=o.precision == "bf16"):
        out = graph.objective(model, graph.interpolant, graph.teacher, draw_batch(graph, graph.local_batch_size))
    out.loss.float().backward()
    if graph.dist.enabled:  # the gradient of the combined batch's loss
        distributed.average_gradients(model.parameters(), graph.dist.world_size)
    params = [p for p in model.parameters() if p.grad is not None]
    graph.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
    graph.last_fault = nonfinite_term(out, graph.last_grad_norm)
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
