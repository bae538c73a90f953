"""Checkpoints: weights in safetensors, metadata in JSON, written atomically (never pickle).

``checkpoints/step-N.safetensors`` holds the model, EMA and optimizer tensors and the RNG states;
``step-N.json`` holds the step, the SHA-256 of the tensor file and the non-tensor state; the
``latest`` file names the newest complete checkpoint and moves only after both files are in place.
Reading goes newest first from ``latest``: a checkpoint whose tensor file does not match the SHA-256
in its metadata is skipped, with a warning, for the previous good one. Tensors are parsed only as
safetensors (from bytes: a file in any other format is refused, never executed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import random

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from flowspec import distributed
from flowspec.errors import UserError


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, fsync, rename.

    On any failure the temporary file is removed and ``path`` is untouched; an ``OSError`` (a full
    disk, a read-only folder) becomes a one-line :class:`UserError` with exit code 1."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"{path}: cannot write: {exc.strerror or exc}", exit_code=1) from None
        raise


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                meta["scalars"][f"{idx}.{name}"] = value
    return tensors, meta


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


STEM = re.compile(r"^step-(\d{8,})$")


def _global_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch, numpy and python global RNG states: tensors for safetensors, the rest for JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(py_state), py_gauss]}
    return tensors, meta


def _set_global_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def save(graph, run_dir: Path, keep: int = 0) -> Path:
    """Write the graph's full training state as checkpoint step-N; returns the tensor file path.

    Order: tensors, then metadata (with the tensors' SHA-256), then the ``latest`` pointer; only
    then are checkpoints beyond the newest ``keep`` removed (0 keeps all).

    In a data-parallel run every rank calls this (their generator states are gathered: each rank
    draws different samples); only rank 0 writes, and the others return None."""
    ranks = _rank_generators(graph)
    if ranks is None:
        return None
    ckpt_dir = run_dir / "checkpoints"
    stem = f"step-{graph.step_count:08d}"
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in graph.model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in graph.ema.model.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer(graph.optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.data"] = graph.data_generator.get_state()
    tensors["rng.train"] = graph.generator.get_state()
    tensors.update(ranks)
    rng_tensors, rng_meta = _global_rng()
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    weights = ckpt_dir / f"{stem}.safetensors"
    atomic_write(weights, lambda p: p.write_bytes(save_bytes(tensors)))
    meta = {"step": graph.step_count, "sha256": sha256(weights), "ema_updates": graph.ema.updates,
            "optimizer": opt_meta, "scheduler": graph.scheduler.state_dict(), "rng": rng_meta,
            "counters": dict(graph.counters), "world_size": graph.dist.world_size}
    atomic_text(ckpt_dir / f"{stem}.json", json.dumps(meta, indent=1, default=str))
    atomic_text(ckpt_dir / "latest", stem + "\n")
    if keep:
        prune(ckpt_dir, keep)
    return weights


TEMPORARY = re.compile(r"^\.(step-\d+\.(json|safetensors)|latest|spec\.toml|metrics\.jsonl|eval\.json"
                       r"|environment\.json)\.[A-Za-z0-9_]+$")


def _rank_generators(graph) -> dict[str, torch.Tensor] | None:
    """Ranks 1..W-1's generator states as ``rng.{data,train}.rank{r}`` on rank 0 ({} for a single
    process); None on the other ranks (they write nothing)."""
    ctx = graph.dist
    if not ctx.enabled:
        return {}
    data = distributed.gather_states(graph.data_generator.get_state(), graph.device)
    train = distributed.gather_states(graph.generator.get_state(), graph.device)
    if not ctx.is_main:
        return None
    out = {}
    for r in range(1, ctx.world_size):
        out[f"rng.data.rank{r}"], out[f"rng.train.rank{r}"] = data[r], train[r]
    return out


def _restore_generators(graph, tensors: dict[str, torch.Tensor], step: int) -> None:
    """This rank's generator states; a rank the checkpoint has none for (the run was resumed with
    more processes) gets generators seeded from its rank and the step."""
    rank = graph.dist.rank
    if rank == 0:
        graph.data_generator.set_state(tensors["rng.data"])
        graph.generator.set_state(tensors["rng.train"])
    elif f"rng.data.rank{rank}" in tensors:
        graph.data_generator.set_state(tensors[f"rng.data.rank{rank}"])
        graph.generator.set_state(tensors[f"rng.train.rank{rank}"])
    else:
        from flowspec.compile import rank_seeds

        data_seed, train_seed = rank_seeds(graph.spec.train.seed + 7919 * step, rank)
        graph.data_generator.manual_seed(data_seed)
        graph.generator.manual_seed(train_seed)


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes cut short (by SIGKILL, say) in a run folder."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for path in folder.glob(".*") if folder.is_dir() else ():
            if TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def stems(ckpt_dir: Path) -> list[str]:
    """Checkpoint names ``step-N`` that have a tensor file, newest first."""
    found = {p.stem for p in ckpt_dir.glob("step-*.safetensors") if STEM.match(p.stem)}
    return sorted(found, key=lambda s: int(s[5:]), reverse=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    current = pointer(ckpt_dir)
    for stem in stems(ckpt_dir)[keep:]:
        if stem != current:
            for suffix in (".json", ".safetensors"):  # metadata first: a lone tensor file is ignored
                (ckpt_dir / f"{stem}{suffix}").unlink(missing_ok=True)


def remove_after(ckpt_dir: Path, step: int) -> None:
    """Remove checkpoints newer than ``step`` (on resume from ``step``: the corrupted ones skipped,
    or ones the pointer never reached; the resumed run writes them again)."""
    for stem in stems(ckpt_dir):
        if int(stem[5:]) > step:
            for suffix in (".json", ".safetensors"):
                (ckpt_dir / f"{stem}{suffix}").unlink(missing_ok=True)


def pointer(ckpt_dir: Path) -> str | None:
    try:
        stem = (ckpt_dir / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return stem if STEM.match(stem) else None


def latest(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path:
    """Tensor file of the newest complete, verified checkpoint of a run folder.

    Starts from the one the ``latest`` pointer names; a truncated or corrupted checkpoint (bad
    metadata, checksum mismatch) is skipped for the previous good one, with a warning through
    ``warn``. Raises a one-line UserError when there is none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    current = pointer(ckpt_dir)
    candidates = stems(ckpt_dir) if ckpt_dir.is_dir() else []
    if current is None and candidates:
        _warn(warn, f"{ckpt_dir / 'latest'}: missing or unreadable; looking for the newest good checkpoint")
    elif current is not None:
        candidates = [s for s in candidates if int(s[5:]) <= int(current[5:])]
    for stem in candidates:
        path = ckpt_dir / f"{stem}.safetensors"
        try:
            verify(path)
        except UserError as exc:
            _warn(warn, f"{exc.lines[0]}; skipped for the previous checkpoint")
            continue
        return path
    raise UserError(f"{run_dir}: no complete checkpoint found in {ckpt_dir}", exit_code=1)


def _warn(warn: Callable[[str], None] | None, message: str) -> None:
    if warn is not None:
        warn(f"warning: {message}")


def read_meta(path: Path) -> dict:
    """The JSON metadata of a checkpoint's tensor file (``step-N.json`` beside it)."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"{meta_path}: unreadable checkpoint metadata: {reason}", exit_code=1) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise UserError(f"{meta_path}: unreadable checkpoint metadata: no sha256", exit_code=1)
    return meta


def verify(path: Path) -> dict:
    """Metadata of a checkpoint whose tensor file matches the SHA-256 recorded in it."""
    meta = read_meta(path)
    try:
        digest = sha256(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}", exit_code=1) from None
    if digest != meta["sha256"]:
        raise UserError(f"{path}: checksum mismatch: the checkpoint is truncated or corrupted", exit_code=1)
    return meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, verified against the SHA-256 in its JSON metadata.

    Only safetensors is parsed: a file in any other format (a pickle renamed, say) is refused
    without being executed."""
    verify(path)
    try:
        return load_bytes(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a safetensors file ({exc})", exit_code=1) from None


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Load ``prefix.*`` tensors into a module; mismatches are one-line errors naming parameters."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(state) & set(expected)
    wrong = sorted(k for k in common if state[k].shape != expected[k].shape)
    dtype = sorted(k for k in common if state[k].dtype != expected[k].dtype and k not in wrong)
    if missing or unexpected or wrong or dtype:
        parts = [f"{label}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong), ("wrong dtype", dtype)) if names]
        raise UserError(f"{source}: checkpoint does not match the network ({'; '.join(parts)})", exit_code=1)
    module.load_state_dict(state)


def restore(graph, path: Path) -> dict:
    """Load a verified checkpoint into a freshly compiled graph: model, EMA, optimizer, schedule,
    step counter, EMA counter, the graph's generators and the global torch/numpy/python RNGs.

    Returns the checkpoint's metadata."""
    tensors = load_tensors(path)
    meta = read_meta(path)
    load_module(graph.model, tensors, "model", path)
    load_module(graph.ema.model, tensors, "ema", path)
    try:
        graph.optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
        graph.scheduler.load_state_dict(meta["scheduler"])
        _restore_generators(graph, tensors, int(meta["step"]))
        _set_global_rng(tensors, meta["rng"])
        graph.step_count = int(meta["step"])
        graph.ema.updates = int(meta["ema_updates"])
        graph.counters = {k: int(v) for k, v in meta.get("counters", {}).items()}
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{path}: checkpoint does not match the training state "
                        f"({type(exc).__name__}: {exc})".replace("\n", " "), exit_code=1) from None
    return meta
