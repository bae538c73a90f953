"""Spec -> TrainingGraph: the only place names become objects (DESIGN.md, "Data flow").

Compiling resolves every component through the registry, checks cross-field facts, seeds and
builds the network, and returns plain PyTorch objects. Compiling twice gives the same graph;
compiling never trains.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from flowspec import distributed
from flowspec.data.base import Dataset
from flowspec.errors import UserError
from flowspec.flowmap import FlowMap
from flowspec.interpolants import GaussianBase, Interpolant
from flowspec.objectives.base import Batch, LossOutput, Objective, Teacher
from flowspec.registry import Registry, default_registry
from flowspec.data.analytic import exact_velocity
from flowspec.teachers import SelfTeacher, load_run_teacher


#: train.precision -> the dtype of the weights and the data (bf16 autocasts float32 weights)
DTYPES = {"float32": torch.float32, "bf16": torch.float32, "float64": torch.float64}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; with several processes on a machine, CUDA device local_rank (mod the count)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but no CUDA device is available (valid: auto, cpu)")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


#: rank r's data and training generators are seeded with seed + 1 + r * RANK_STRIDE and
#: seed + 2 + r * RANK_STRIDE (rank 0 draws what a single process draws)
RANK_STRIDE = 1_000_003


def rank_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(data seed, training seed) of rank ``rank``."""
    return seed + 1 + rank * RANK_STRIDE, seed + 2 + rank * RANK_STRIDE


def lr_factor(spec_train, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    o = spec_train
    k = step + 1
    warm = min(1.0, k / o.warmup_steps) if o.warmup_steps else 1.0
    if o.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, o.steps) / o.steps))
    elif o.schedule == "sqrt":
        decay = 1 / math.sqrt(max(1.0, k / o.decay_start))
    else:
        decay = 1.0
    return warm * decay


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied), theta_ema <-
    theta_ema + w_k (theta - theta_ema) at the k-th update (k = 1, 2, ...), w_k = 1 - d_k:

    * "plain": d_k = decay, started from the initial weights (the reference code's EMA);
    * "warmup": d_k = min(decay, (1 + k) / (10 + k)), so a short run's average forgets the init;
    * "bias_corrected": w_k = (1 - decay) / (1 - decay^k), Adam's bias correction: the average
      of the iterates weighted by decay^(k - j) and normalised, exactly (the init gets weight 0).
    """

    def __init__(self, model: torch.nn.Module, decay: float, schedule: str = "warmup"):
        self.decay, self.schedule = decay, schedule
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
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
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


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


@dataclass
class TrainingGraph:
    """Everything a run needs, as objects. ``step()`` performs one optimizer step."""

    spec: BaseModel
    dataset: Dataset
    interpolant: Interpolant
    base: GaussianBase
    model: FlowMap
    ema: EMA
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

    @property
    def local_batch_size(self) -> int:
        """B / W: the samples this process draws per step."""
        return self.spec.train.batch_size // self.dist.world_size

    def batch(self, n: int) -> Batch:
        """x1 from the data stream (CPU generator), x0 from the base (device generator), on device.
        The graph owns both generators: two graphs never share random numbers."""
        x1 = self.dataset.sample(n, self.data_generator).to(self.device, DTYPES[self.spec.train.precision])
        x0 = self.base.sample(n, tuple(x1.shape[1:]), device=self.device, dtype=x1.dtype,
                              generator=self.generator)
        return Batch(x0=x0, x1=x1, generator=self.generator)

    def step(self) -> LossOutput:
        """One optimizer step: loss, backward, clip, update, schedule, EMA.

        A non-finite loss or gradient norm skips the update and the EMA (the schedule and the step
        counter still advance) and names the faulty term in ``last_fault``."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec.train.precision == "bf16"):
            out = self.objective(self.model, self.interpolant, self.teacher,
                                 self.batch(self.local_batch_size))
        out.loss.float().backward()
        if self.dist.enabled:  # the gradient of the combined batch's loss
            distributed.average_gradients(self.model.parameters(), self.dist.world_size)
        clip = self.spec.train.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.last_fault = nonfinite_term(out, self.last_grad_norm)
        if self.last_fault is None:
            self.optimizer.step()
            self.scheduler.step()
        else:  # a non-finite loss or gradient never reaches the weights, the optimizer or the EMA
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # the schedule keeps its pace ("scheduler before optimizer")
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        if self.last_fault is None:
            self.ema.update(self.model)
        self.step_count += 1
        return out

    def sampler(self) -> FlowMap:
        """The weights used for sampling and evaluation: the EMA."""
        return self.ema.model

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(registry: Registry, group: str, options: BaseModel, *args) -> Any:
    cls = registry.get(group, getattr(options, "characterization", None) or options.kind)
    base_fields = set(cls.Options.model_fields)
    return cls(cls.Options(**options.model_dump(include=base_fields)), *args)


class _AnalyticPlaceholder:
    """Marks kind = "analytic" until the base scale is known (the exact velocity depends on it)."""


def _frozen_teacher(spec: BaseModel, registry: Registry, dataset: Dataset, device: torch.device):
    """The [teacher] section's velocity (compile-time errors for a missing closed form, a bad run
    folder, or a data shape other than the spec's)."""
    t = getattr(spec, "teacher", None)
    if t is None:
        return None
    if t.kind == "run":
        return load_run_teacher(t.path, device, tuple(dataset.shape))
    interpolant = build(registry, "interpolants", spec.interpolant)
    if exact_velocity(dataset, interpolant, 1.0) is None:
        raise UserError(f'teacher.kind: "analytic" needs a dataset with a closed-form velocity; '
                        f'{spec.data.kind} has none (valid: gaussian, gmm, eight_gaussians, checkerboard)')
    return _AnalyticPlaceholder()


def preconditioning(scale: float | str, dataset: Dataset) -> float:
    """The flow map's c: a number as given, or "data_std": sqrt(mean_d std_d^2) of the data."""
    if scale == "data_std":
        return float(dataset.std().double().pow(2).mean().sqrt())
    return float(scale)


def _seed(seed: int) -> None:
    """Seed torch's, numpy's and python's global RNGs, for components that use them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def compile_spec(spec: BaseModel, registry: Registry | None = None) -> TrainingGraph:
    """Build the TrainingGraph of a validated spec (see :func:`flowspec.spec.load_spec`)."""
    from flowspec.checks import check_spec

    registry = registry or default_registry()
    problems = check_spec(spec, registry)  # every mistake at once, before anything is allocated
    if problems:
        raise UserError(problems)
    o = spec.train
    ctx = distributed.current()
    device = resolve_device(o.device, ctx.local_rank)
    if o.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size: {o.batch_size} samples do not split evenly over {ctx.world_size} "
                        f"processes (valid: a multiple of {ctx.world_size})")
    _seed(o.seed)
    dataset: Dataset = build(registry, "datasets", spec.data)  # once: an image dataset is read from disk
    frozen = _frozen_teacher(spec, registry, dataset, device)
    _seed(o.seed)  # loading a teacher run compiles its spec, which seeds with the teacher's seed

    interpolant: Interpolant = build(registry, "interpolants", spec.interpolant)
    try:
        objective: Objective = build(registry, "objectives", spec.objective)
    except ValueError as exc:
        raise UserError(f"objective.target: {exc}") from None
    if objective.options.target == "teacher" and frozen is None:
        raise UserError('objective.target: "teacher" needs a [teacher] section '
                        '(kind = "analytic", or kind = "run" with path = "RUN_FOLDER")')

    scale = spec.interpolant.base_scale
    c = dataset.std() if scale == "data_std" else torch.tensor(float(scale))
    base = GaussianBase(c.to(device))

    net = build(registry, "networks", spec.network, tuple(dataset.shape))
    log_weight = None
    if getattr(objective.options, "learned_weight", False):
        from flowspec.weighting import LogVarianceWeight

        log_weight = LogVarianceWeight()
    # every network's options carry its preconditioning c: X = x + (t - s) c net(x / c, s, t)
    model = FlowMap(net, scale=preconditioning(spec.network.scale, dataset),
                    log_weight=log_weight).to(device, DTYPES[o.precision])
    if ctx.enabled:  # identical weights everywhere (the same seed gives them too; this makes sure)
        distributed.broadcast_module(model)
    ema = EMA(model, o.ema, o.ema_schedule)
    if o.compile:
        model.compile_network()
    teacher = SelfTeacher(ema.model if objective.options.ema_target else model)
    exact = exact_velocity(dataset, interpolant, c)
    if isinstance(frozen, _AnalyticPlaceholder):
        frozen = exact
    if objective.options.target == "teacher":
        teacher = frozen
    for row in spec.eval.ode:
        if row.velocity == "teacher" and frozen is None:
            raise UserError(f'eval.ode: {row.label()}: velocity = "teacher" needs a [teacher] section')
        if row.velocity == "exact" and exact is None:
            raise UserError(f'eval.ode: {row.label()}: velocity = "exact" needs a dataset with a '
                            f'closed-form velocity; {spec.data.kind} has none')

    opt_cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.optimizer]
    optimizer = opt_cls(model.parameters(), lr=o.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(o, k))

    metrics = {}
    probe = dataset.sample(16, torch.Generator().manual_seed(0))
    for name in spec.eval.metrics:
        cls = registry.get("metrics", name)
        try:
            metric = cls(cls.Options(**spec.eval.metric_options.get(name, {})))
        except ValidationError as exc:
            e = exc.errors(include_url=False)[0]
            key = ".".join(str(p) for p in e["loc"])
            raise UserError(f"eval.metric_options.{name}.{key}: {e['msg']} "
                            f"(valid keys: {', '.join(cls.Options.model_fields) or 'none'})") from None
        try:
            check = getattr(metric, "check", None)  # a cheap availability check, else a probe call
            check(dataset) if check is not None else metric(probe, dataset, torch.Generator().manual_seed(0))
        except ValueError as exc:  # MetricUnavailable
            raise UserError(f"eval.metrics: {exc}") from None
        metrics[name] = metric
    for name in spec.eval.metric_options:
        if name not in spec.eval.metrics:
            raise UserError(f"eval.metric_options.{name}: {name} is not in eval.metrics "
                            f"(valid: {', '.join(spec.eval.metrics)})")

    return TrainingGraph(spec=spec, dataset=dataset, interpolant=interpolant, base=base,
                         model=model, ema=ema, objective=objective, teacher=teacher,
                         optimizer=optimizer, scheduler=scheduler, metrics=metrics, device=device,
                         exact=exact, frozen_teacher=frozen, dist=ctx, teacher_pin=getattr(frozen, "pin", None),
                         data_generator=torch.Generator().manual_seed(rank_seeds(o.seed, ctx.rank)[0]),
                         generator=torch.Generator(device).manual_seed(rank_seeds(o.seed, ctx.rank)[1]))
