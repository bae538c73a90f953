"""Spec -> TrainingGraph (docs/design.md, "Data flow"): every check of the spec, then the components built
through the registry (flowspec.build), the network initialised from ``train.seed``, the optimizer,
schedule, EMA, teacher and metrics, as plain PyTorch objects (flowspec.engine.TrainingGraph).

Compiling twice gives the same graph. Compiling has no global side effects: the weights are drawn
under a forked RNG, so torch's global generator is as it was; it never trains and writes nothing.
"""

from __future__ import annotations

import torch

from flowspec import distributed, parallel
from flowspec.build import base_scale, build, build_flow_map, build_metrics, preconditioning, seeded
from flowspec.checks import check_spec
from flowspec.data.analytic import exact_velocity
from flowspec.data.base import Dataset
from flowspec.engine import EMA, TrainingGraph, lr_factor
from flowspec.errors import UserError
from flowspec.interpolants import GaussianBase, Interpolant
from flowspec.objectives.base import Objective
from flowspec.registry import Registry, default_registry
from flowspec.spec.models import SpecView
from flowspec.teachers import SelfTeacher, load_run_teacher


class _AnalyticPlaceholder:
    """Marks kind = "analytic" until the base scale is known (the exact velocity depends on it)."""


def _frozen_teacher(spec: SpecView, registry: Registry, dataset: Dataset, device: torch.device):
    """The [teacher] section's velocity (compile-time errors for a missing closed form, a bad run
    folder, or a data shape other than the spec's)."""
    t = spec.teacher
    if t is None:
        return None
    if t.kind == "run":
        return load_run_teacher(t.run_folder, device, tuple(dataset.shape))
    interpolant = build(registry, "interpolants", spec.interpolant)
    if exact_velocity(dataset, interpolant, 1.0) is None:
        raise UserError(f'teacher.kind: "analytic" needs a dataset with a closed-form velocity; '
                        f'{spec.data.kind} has none (valid: gaussian, gmm, eight_gaussians, checkerboard)')
    return _AnalyticPlaceholder()


def compile_spec(spec: SpecView, registry: Registry | None = None) -> TrainingGraph:
    """Build the TrainingGraph of a validated spec (see :func:`flowspec.spec.load_spec`)."""
    registry = registry or default_registry()
    problems = check_spec(spec, registry)  # every mistake at once, before anything is allocated
    if problems:
        raise UserError(problems)
    o = spec.train
    ctx = distributed.current()
    device = distributed.resolve_device(o.device, ctx.local_rank)
    problems = distributed.split_problems(o, ctx.world_size, distributed.backend(device.type),
                                          spec.objective.diagonal_fraction)
    if problems:
        raise UserError(problems)
    with seeded(o.seed):
        dataset: Dataset = build(registry, "datasets", spec.data)  # once: an image dataset is read from disk
    frozen = _frozen_teacher(spec, registry, dataset, device)
    interpolant: Interpolant = build(registry, "interpolants", spec.interpolant)
    try:
        objective: Objective = build(registry, "objectives", spec.objective)
    except ValueError as exc:
        raise UserError(f"objective.target: {exc}") from None
    if objective.options.target == "teacher" and frozen is None:
        raise UserError('objective.target: "teacher" needs a [teacher] section '
                        '(kind = "analytic", or kind = "run" with path = "RUN_FOLDER")')
    c = base_scale(spec, dataset)
    base = GaussianBase(c.to(device))
    with seeded(o.seed):  # every network's options carry its preconditioning c: X = x + (t - s) c net(x / c, s, t)
        model = build_flow_map(spec, tuple(dataset.shape), preconditioning(spec.network.scale, dataset),
                               registry).to(device)
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

    # DDP around the loss, or FSDP2 sharding the model in place: before the optimizer sees the parameters
    loss_module = parallel.wrap(o, model, objective, interpolant, teacher, ctx)
    opt_cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.optimizer]
    optimizer = opt_cls(model.parameters(), lr=o.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(o, k))

    with seeded(o.seed):  # a metric's probe may draw random numbers (the digits classifier trains)
        metrics = build_metrics(spec, registry, dataset)
    for name in spec.eval.metric_options:
        if name not in spec.eval.metrics:
            raise UserError(f"eval.metric_options.{name}: {name} is not in eval.metrics "
                            f"(valid: {', '.join(spec.eval.metrics)})")

    # every rank draws the whole batch from the same streams; its own only what its loss draws
    data_seed, batch_seed = distributed.stream_seeds(o.seed)
    local = torch.Generator(device).manual_seed(distributed.local_seed(o.seed, ctx.rank)) if ctx.enabled else None
    return TrainingGraph(spec=spec, dataset=dataset, interpolant=interpolant, base=base,
                         model=model, ema=ema, objective=objective, teacher=teacher,
                         optimizer=optimizer, scheduler=scheduler, metrics=metrics, device=device,
                         exact=exact, frozen_teacher=frozen, dist=ctx, teacher_pin=getattr(frozen, "pin", None),
                         data_generator=torch.Generator().manual_seed(data_seed),
                         generator=torch.Generator(device).manual_seed(batch_seed),
                         loss_module=loss_module, local_generator=local)
