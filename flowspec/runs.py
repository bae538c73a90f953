"""A run folder, read: its resolved spec, its verified checkpoints and its EMA flow map.

:class:`RunFolder` is the one reader behind ``flowspec sample``, ``flowspec check``, resuming and
``[teacher] kind = "run"``. It only reads (spec.toml and checkpoint files, every byte verified,
nothing pickled), and loading the flow map builds only the network: the data's shape, the map's
preconditioning c and the base's scale are in the checkpoint (checkpoints written before they
were are read with the dataset built from the spec instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from flowspec import checkpoint, distributed
from flowspec.build import base_scale, build, build_flow_map, dataset_facts, preconditioning, seeded
from flowspec.checkpoint import Checkpoint
from flowspec.errors import UserError
from flowspec.flowmap import FlowMap
from flowspec.interpolants import GaussianBase
from flowspec.registry import default_registry
from flowspec.spec import load_spec
from flowspec.spec.models import SpecView

Warn = Callable[[str], None]


@dataclass
class LoadedMap:
    """A run's EMA flow map (eval mode, no gradients) and where it came from.

    Attributes:
        flow_map: X_{s,t}, on the requested device.
        shape: the per-sample data shape.
        base_scale: c of the base N(0, c^2 I): a 0-d tensor, or one value per data dimension.
        checkpoint: the file the weights came from; ``digest`` its verified SHA-256.
    """

    flow_map: FlowMap
    shape: tuple[int, ...]
    base_scale: torch.Tensor
    checkpoint: Path
    digest: str

    def base_samples(self, n: int, seed: int) -> torch.Tensor:
        """n base samples x0 (the same for a seed on every device and in every run of this shape)."""
        p = next(self.flow_map.parameters())
        return GaussianBase(self.base_scale).fixed(n, self.shape, seed, device=p.device, dtype=p.dtype)


def read_records(run_dir: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl, in order (a partly written or unreadable line
    skipped; no file: none)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def _diff(a: SpecView, b: SpecView, ignore: tuple[str, ...]) -> list[str]:
    def flat(data: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in set(fa) | set(fb)
                  if not k.startswith(ignore) and fa.get(k) != fb.get(k))  # a key, or a section "name."


class RunFolder:
    """A flowspec run folder, opened for reading.

    Args:
        path: the folder.
        label: prefix of error messages (e.g. "teacher.path: ").
    Raises:
        UserError: the folder has no spec.toml.
    """

    def __init__(self, path: Path | str, label: str = ""):
        self.path, self.label = Path(path), label
        if not self.spec_path.is_file():
            raise UserError(f"{label}{path}: not a run folder (no spec.toml)")

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.toml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @cached_property
    def spec(self) -> SpecView:
        """The resolved spec the run was trained with."""
        return load_spec(self.spec_path)

    @property
    def identity(self) -> str:
        """The run's identity (its spec but train.steps): a checkpoint of another run is refused."""
        return checkpoint.spec_id(self.spec)

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present (newest first), unverified."""
        return [int(s[5:]) for s in checkpoint.stems(self.checkpoints)]

    def checkpoint(self, limit: int, step: int | None = None, warn: Warn | None = None,
                   accept: Callable[[Checkpoint], None] | None = None) -> Checkpoint:
        """The newest good checkpoint (:func:`flowspec.checkpoint.newest`: damaged and foreign ones
        skipped with a warning; ``accept`` may refuse one), or the one at ``step``; every byte verified.

        Raises:
            UserError: no (such) good checkpoint.
        """
        if step is None:
            return checkpoint.newest(self.path, warn, limit, self.identity, accept=accept)
        path = self.checkpoints / f"step-{step:08d}.safetensors"
        if not path.is_file():
            have = ", ".join(str(k) for k in self.steps()) or "none"
            raise UserError(f"{self.label}{self.path}: no checkpoint at step {step} (have: {have})", exit_code=1)
        ckpt = checkpoint.read(path, limit, self.identity)
        if accept is not None:
            accept(ckpt)
        return ckpt

    def size_limit(self) -> int:
        """The most bytes a checkpoint of this run can hold (:func:`flowspec.checkpoint.size_limit`
        of the spec's network, counted on the meta device), checked before a file is read."""
        shape = dataset_facts(self.spec, default_registry())[0].shape  # images: the class's known shape
        if shape is None:
            return checkpoint.UNBOUNDED
        with torch.device("meta"):
            return checkpoint.size_limit(build_flow_map(self.spec, tuple(shape), 1.0))

    def _geometry(self, ckpt: Checkpoint) -> tuple[tuple[int, ...], float, torch.Tensor]:
        """(data shape, the map's c, the base's c): from the checkpoint, else from the dataset."""
        if "flow_map" in ckpt.state and "base.scale" in ckpt.tensors:
            fm = ckpt.state["flow_map"]
            return tuple(int(d) for d in fm["shape"]), float(fm["scale"]), ckpt.tensors["base.scale"]
        spec = self.spec  # a checkpoint written before they were recorded
        with seeded(spec.train.seed):
            dataset = build(default_registry(), "datasets", spec.data)
        return tuple(dataset.shape), preconditioning(spec.network.scale, dataset), base_scale(spec, dataset)

    def flow_map(self, device: str = "auto", step: int | None = None, warn: Warn | None = None) -> LoadedMap:
        """The EMA flow map of the newest good checkpoint (or of ``step``), frozen, on ``device``.

        Raises:
            UserError: no (such) good checkpoint, or weights that do not fit the spec's network.
        """
        target = distributed.resolve_device(device)
        ckpt = self.checkpoint(self.size_limit(), step, warn)
        shape, scale, base = self._geometry(ckpt)
        with seeded(0):  # the initial weights are overwritten: no draw from the global generator
            model = build_flow_map(self.spec, shape, scale)
        checkpoint.load_module(model, ckpt.tensors, "ema", ckpt.path)
        model = model.to(target).requires_grad_(False).eval()
        return LoadedMap(model, shape, base.float(), ckpt.path, ckpt.digest)

    def check_resumable(self, spec: SpecView, source: str) -> None:
        """An error unless ``spec`` equals the run's spec but for train.steps; ``source`` names where
        ``spec`` came from."""
        diff = _diff(self.spec, spec, ignore=("train.steps", "log."))
        if diff:
            raise UserError(f"{source}: differs from the run's spec {self.spec_path} in {', '.join(diff)} "
                            "(only train.steps and [log] may change on resume)")
