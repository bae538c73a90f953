"""Checkpoints: weights in safetensors, metadata in JSON, written atomically (never pickle).

``checkpoints/step-N.safetensors`` holds the model, EMA and optimizer tensors and the RNG states;
``step-N.json`` holds the step, the SHA-256 of the tensor file and the non-tensor state; the
``latest`` file names the newest complete checkpoint and moves only after both files are in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flowspec.errors import UserError


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def save(graph, run_dir: Path) -> Path:
    """Write the graph's full training state as checkpoint step-N; returns the tensor file path."""
    ckpt_dir = run_dir / "checkpoints"
    stem = f"step-{graph.step_count:08d}"
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in graph.model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in graph.ema.model.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer(graph.optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.data"] = graph.data_generator.get_state()
    tensors["rng.train"] = graph.generator.get_state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    weights = ckpt_dir / f"{stem}.safetensors"
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    meta = {"step": graph.step_count, "sha256": sha256(weights), "ema_updates": graph.ema.updates,
            "optimizer": opt_meta, "scheduler": graph.scheduler.state_dict()}
    atomic_text(ckpt_dir / f"{stem}.json", json.dumps(meta, indent=1, default=str))
    atomic_text(ckpt_dir / "latest", stem + "\n")
    return weights


def latest(run_dir: Path) -> Path:
    """Tensor file of the newest complete checkpoint of a run folder."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        stem = pointer.read_text().strip()
    except OSError:
        raise UserError(f"{run_dir}: no checkpoint found (missing {pointer})") from None
    return pointer.parent / f"{stem}.safetensors"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, verified against the SHA-256 in its JSON metadata."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path}: unreadable checkpoint metadata: {exc}", exit_code=1) from None
    if sha256(path) != meta.get("sha256"):
        raise UserError(f"{path}: checksum mismatch: the checkpoint is truncated or corrupted", exit_code=1)
    return load_file(str(path))


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Load ``prefix.*`` tensors into a module; mismatches are one-line errors naming parameters."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong)) if names]
        raise UserError(f"{source}: checkpoint does not match the network ({'; '.join(parts)})", exit_code=1)
    module.load_state_dict(state)
