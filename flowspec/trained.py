"""A trained run, used from Python: :func:`load_run` opens a run folder read-only and gives its spec,
its EMA flow map, samples shaped like the data, metrics on demand and its checkpoints::

    run = flowspec.load_run("runs/checkerboard-lsd-20250101-120000")
    x = run.sample(10_000, steps=2)        # (10000, 2): the same x0 as eval.json's (eval.seed)
    table = run.evaluate(steps=[1, 2, 4])  # {"1": {"kl": ..., "energy": ..., "nfe": 1, ...}, ...}

Nothing is ever written to the folder (``flowspec eval`` writes its records, evals/eval-*.json, with
:func:`flowspec.cli_eval.write_eval`). The numbers equal the run's own evaluation for the same
checkpoint, samples, metrics and seed (a CPU run, bit for bit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flowspec.build import base_scale, build, build_metrics, seeded
from flowspec.data.base import Dataset
from flowspec.errors import UserError
from flowspec.evaluate import endpoint_error, sample, score, solve_endpoints
from flowspec.flowmap import FlowMap
from flowspec.registry import default_registry
from flowspec.runs import LoadedMap, RunFolder, Warn, read_records


class CheckpointFile(NamedTuple):
    """One checkpoint of a run: its step and its file."""

    step: int
    path: Path


class Run:
    """A run folder opened read-only with the EMA weights of one checkpoint (see :func:`load_run`).

    Attributes:
        path: the run folder.
        spec: the resolved spec it was trained with.
        flow_map: the EMA flow map X_{s,t} (eval mode, no gradients) on ``device``.
        shape: the per-sample data shape.
        step: the step of the loaded checkpoint; ``checkpoint`` its file, ``digest`` its verified SHA-256.
    """

    def __init__(self, folder: RunFolder, loaded: LoadedMap):
        self.folder, self._loaded = folder, loaded
        self.path, self.spec = folder.path, folder.spec
        self.flow_map: FlowMap = loaded.flow_map
        self.shape: tuple[int, ...] = loaded.shape
        self.checkpoint: Path = loaded.checkpoint
        self.digest: str = loaded.digest
        self.step = int(loaded.checkpoint.stem.split("-")[-1])

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, step={self.step}, shape={self.shape}, device={str(self.device)!r})"

    @property
    def device(self) -> torch.device:
        return next(self.flow_map.parameters()).device

    @property
    def checkpoints(self) -> list[CheckpointFile]:
        """Every checkpoint file present, oldest first (unverified; load one with ``load_run(path, step=...)``)."""
        ckpts = self.folder.checkpoints
        return [CheckpointFile(k, ckpts / f"step-{k:08d}.safetensors") for k in sorted(self.folder.steps())]

    @property
    def records(self) -> list[dict]:
        """The training records of metrics.jsonl (losses by step, evaluations), in order."""
        return read_records(self.path)

    @property
    def eval_result(self) -> dict | None:
        """The run's final evaluation (eval.json), or None when it has none (yet)."""
        path = self.path / "eval.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @cached_property
    def dataset(self) -> Dataset:
        """The run's dataset, built as training built it (from ``train.seed``)."""
        with seeded(self.spec.train.seed):
            return build(default_registry(), "datasets", self.spec.data)

    def base_samples(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n base samples x0 ~ N(0, c^2 I) on ``device``; ``seed`` None: ``eval.seed``, the run's own
        evaluation draws."""
        return self._loaded.base_samples(n, self.spec.eval.seed if seed is None else seed)

    def sample(self, n: int, steps: int = 1, seed: int | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
        """K-step samples of the EMA flow map on the uniform grid, shaped (n, *data shape), float32 on
        the CPU; from base samples of ``seed`` (None: ``eval.seed``, the x0 of the run's samples/
        and eval.json), or from ``x0`` when given."""
        _positive("steps", steps)
        if x0 is None:
            _positive("n", n)
            x0 = self.base_samples(n, seed)
        return sample(self.flow_map, x0.to(self.device, next(self.flow_map.parameters()).dtype), steps)

    def evaluate(self, steps: int | Iterable[int] | None = None, metrics: Iterable[str] | None = None,
                 n: int | None = None, seed: int | None = None, flow_map_error: bool | None = None) -> dict:
        """Metrics of the K-step samples for each K, as the run's own evaluation computes them.

        Args:
            steps: the Ks (default ``eval.steps``).
            metrics: registered metric names (default ``eval.metrics``), with the run's
                ``eval.metric_options``.
            n: samples per K (default ``eval.num_samples``).
            seed: of the base samples (default ``eval.seed``; the metrics draw from seed + 1).
            flow_map_error: add the MSE against the true map X_{0,1} where the data has a closed-form
                velocity (default ``eval.flow_map_error``).
        Returns:
            {str(K): {metric: value, "flow_map_error" (when it applies), "nfe": K, "seconds": sampling
            wall time}}, like eval.json's "steps".
        """
        o = self.spec.eval
        ks = [steps] if isinstance(steps, int) else list(o.steps if steps is None else steps)
        names = list(o.metrics if metrics is None else metrics)
        n = o.num_samples if n is None else n
        seed = o.seed if seed is None else seed
        for k in ks:
            _positive("steps", k)
        _positive("n", n)
        if not ks:
            raise UserError("steps: none given (valid: one or more whole numbers >= 1)")
        known = default_registry().names("metrics")
        for name in names:
            if name not in known:
                raise UserError(f"metrics: unknown metric {name!r} (known: {', '.join(known)})")
        with seeded(self.spec.train.seed):  # as compiling built them (a metric's probe may draw)
            built = build_metrics(self.spec, default_registry(), self.dataset, names)
        x0 = self.base_samples(n, seed)
        truth = None
        if o.flow_map_error if flow_map_error is None else flow_map_error:
            exact = self.exact_velocity
            truth = None if exact is None else solve_endpoints(exact.velocity, x0[: o.flow_map_samples])
        results: dict[str, dict[str, Any]] = {}
        for k in ks:
            start = time.perf_counter()
            x = sample(self.flow_map, x0, k)
            seconds = time.perf_counter() - start
            row: dict[str, Any] = score(x, built, self.dataset, seed)
            endpoint_error(x, truth, row)
            results[str(k)] = {**row, "nfe": k, "seconds": seconds}
        return results

    @cached_property
    def exact_velocity(self):
        """The closed-form velocity b_t(x) of the run's data and interpolant, or None."""
        from flowspec.data.analytic import exact_velocity

        interpolant = build(default_registry(), "interpolants", self.spec.interpolant)
        return exact_velocity(self.dataset, interpolant, base_scale(self.spec, self.dataset))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}: {value!r} is not valid (valid: a whole number >= 1)")


def load_run(path: str | Path, device: str = "auto", step: int | None = None, warn: Warn | None = None) -> Run:
    """Open a run folder read-only with the EMA weights of its newest good checkpoint (or of ``step``),
    every byte verified; ``device``: auto | cpu | cuda.

    Raises:
        UserError: not a run folder, or no (such) good checkpoint.
    """
    folder = RunFolder(path)
    return Run(folder, folder.flow_map(device, step=step, warn=warn))


__all__ = ["CheckpointFile", "Run", "load_run"]
