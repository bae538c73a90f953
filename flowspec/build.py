"""Building components from their spec sections through the registry: a name becomes an object here
and nowhere else. Building has no side effects (no training, no files); :func:`seeded` draws from the global
generators without changing them.

The flow map is built from its spec alone given the data's shape and the preconditioning c
(:func:`build_flow_map`), so a run's weights can be loaded without its dataset (flowspec.runs).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from flowspec.data.base import Dataset
from flowspec.flowmap import FlowMap
from flowspec.registry import Registry, default_registry
from flowspec.spec.models import SpecView

#: train.precision -> the dtype of the weights and the data (bf16 autocasts float32 weights)
DTYPES = {"float32": torch.float32, "bf16": torch.float32, "float64": torch.float64}


def build(registry: Registry, group: str, options: BaseModel, *args: Any) -> Any:
    """The component of ``group`` that ``options`` names (its ``kind``, or the objective's
    ``characterization``), constructed as ``cls(cls.Options(...), *args)``."""
    name = getattr(options, "characterization", None) or options.kind  # type: ignore[attr-defined]
    cls = registry.get(group, name)
    return cls(cls.Options(**options.model_dump(include=set(cls.Options.model_fields))), *args)


def build_metrics(spec: SpecView, registry: Registry, dataset: Dataset,
                  names: list[str] | None = None) -> dict[str, Any]:
    """The metrics ``names`` (default ``eval.metrics``) built with their ``eval.metric_options``, each
    checked against the dataset (a cheap check, else a probe call on 16 of its samples).

    Raises:
        UserError: bad options (``eval.metric_options.NAME.KEY: ...``), or a metric the data cannot have.
    """
    from pydantic import ValidationError

    from flowspec.errors import UserError

    metrics: dict[str, Any] = {}
    probe = dataset.sample(16, torch.Generator().manual_seed(0))
    for name in spec.eval.metrics if names is None else names:
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
    return metrics


def dataset_facts(spec: SpecView, registry: Registry) -> tuple[Any, bool]:
    """A dataset object for checks: built when cheap (toy data), else an unloaded stand-in of an
    image dataset whose ``shape`` is its class's ``known_shape`` (None: unknown until read); and
    whether it is the real dataset."""
    from flowspec.data.images import ImageDataset

    cls = registry.get("datasets", spec.data.kind)
    if issubclass(cls, ImageDataset):
        stub = cls.__new__(cls)
        stub.options = cls.Options(**spec.data.model_dump(include=set(cls.Options.model_fields)))
        stub.shape = cls.known_shape
        return stub, False
    return build(registry, "datasets", spec.data), True


def preconditioning(scale: float | str, dataset: Dataset) -> float:
    """The flow map's c: a number as given, or "data_std": sqrt(mean_d std_d^2) of the data."""
    if scale == "data_std":
        return float(dataset.std().double().pow(2).mean().sqrt())
    return float(scale)


def base_scale(spec: SpecView, dataset: Dataset) -> torch.Tensor:
    """c of the base x0 ~ N(0, c^2 I): ``interpolant.base_scale``, a number (a 0-d tensor) or
    "data_std" (the data's per-dimension standard deviation, shaped like one sample)."""
    scale = spec.interpolant.base_scale
    return dataset.std() if scale == "data_std" else torch.tensor(float(scale))


def build_flow_map(spec: SpecView, shape: tuple[int, ...], scale: float,
                   registry: Registry | None = None) -> FlowMap:
    """The spec's flow map X = x + (t - s) c net(x / c, s, t) for samples of ``shape``, with c =
    ``scale`` (:func:`preconditioning`), on the CPU in the spec's precision, freshly initialised
    from torch's global generator (seed it, or load weights, as the caller needs). With
    ``objective.learned_weight`` it carries the log-variance weight network (flowspec.weighting),
    which is part of its state."""
    registry = registry or default_registry()
    net = build(registry, "networks", spec.network, tuple(shape))
    log_weight = None
    if spec.objective.learned_weight:
        from flowspec.weighting import LogVarianceWeight

        log_weight = LogVarianceWeight()
    return FlowMap(net, scale=scale, log_weight=log_weight).to(DTYPES[spec.train.precision])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's (CPU and CUDA), numpy's and python's global generators seeded with ``seed`` inside,
    and as they were before afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
