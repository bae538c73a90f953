"""A training graph's state as tensors (for safetensors) and plain JSON data: model, EMA, optimizer,
schedule, counters, every random generator, and the flow map's geometry (data shape, its c, the
base's c: what loading the map alone needs, flowspec.runs); and back (flowspec.checkpoint writes and
reads it)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowspec import distributed, parallel
from flowspec.errors import UserError

#: the streams of flowspec.distributed: the whole batch drawn alike by every rank (a checkpoint
#: without this mark drew per rank, and resumes with its own process count only)
STREAMS = "global"


def collect(graph) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the graph's full training state but the FSDP shards of parameters and
    moments (:func:`flowspec.parallel.shards`, which flowspec.shards writes); None on ranks other
    than 0 (in a data-parallel run every rank calls this: the local generator states and the
    0-dimensional sharded parameters are gathered, and whether any rank's loss drew random numbers)."""
    main = graph.dist.is_main  # collectives first, on every rank alike (only rank 0 keeps whole copies)
    model = parallel.model_state(graph.model, keep=main, whole=False)  # the shards: flowspec.shards
    optimizer = parallel.optimizer_state(graph.optimizer, graph.model, keep=main, whole=False)
    ranks = _rank_generators(graph)
    split_free = graph.split_free
    if graph.dist.enabled:
        split_free = not distributed.any_flag(not split_free, graph.device)
    if ranks is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.items()})
    tensors.update({f"ema.{k}": v for k, v in graph.ema.model.state_dict().items()})
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.data"] = graph.data_generator.get_state()
    tensors["rng.train"] = graph.generator.get_state()
    tensors["base.scale"] = graph.base.scale  # with "flow_map": the map loads without its dataset
    tensors.update(ranks)
    rng_tensors, rng_meta = _global_rng()
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    state = {"step": graph.step_count, "ema_updates": graph.ema.updates, "optimizer": opt_meta,
             "scheduler": graph.scheduler.state_dict(), "rng": rng_meta, "counters": dict(graph.counters),
             "world_size": graph.dist.world_size, "streams": STREAMS, "split_free": split_free,
             "flow_map": {"shape": list(graph.dataset.shape), "scale": graph.model.scale}}
    return tensors, state


def apply(graph, tensors: dict[str, torch.Tensor], state: dict, source: Path) -> None:
    """Load (tensors, state) into a freshly compiled graph; a one-line UserError (exit 1) when they
    do not fit it (the modules are checked before anything is changed)."""
    model = check_module(graph.model, tensors, "model", source, parallel.expected_state(graph.model))
    check_module(graph.ema.model, tensors, "ema", source)
    try:
        step, ema_updates = int(state["step"]), int(state["ema_updates"])
        counters = {str(k): int(v) for k, v in state.get("counters", {}).items()}
        parallel.load_model_state(graph.model, model)
        load_module(graph.ema.model, tensors, "ema", source)
        parallel.load_optimizer_state(graph.optimizer, graph.model, _join_optimizer(tensors, state["optimizer"]))
        graph.scheduler.load_state_dict(state["scheduler"])
        _restore_generators(graph, tensors, state)
        _set_global_rng(tensors, state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise UserError(f"{source}: checkpoint does not match the training state "
                        f"({type(exc).__name__}: {exc})".replace("\n", " "), exit_code=1) from None
    graph.step_count, graph.ema.updates, graph.counters = step, ema_updates, counters
    # sticky over resumes; unknown (a checkpoint from before the shared streams) counts as drawn
    graph.split_free = bool(state.get("split_free", False))


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



def _global_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch, numpy and python global RNG states: tensors for safetensors, the rest for JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np.asarray(keys).astype(np.int64))}
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(py_state), py_gauss]}
    return tensors, meta


def _set_global_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))



def _rank_generators(graph) -> dict[str, torch.Tensor] | None:
    """Every rank's local generator state as ``rng.local.rank{r}`` on rank 0 ({} for a single
    process, which has none); None on the other ranks (they write nothing)."""
    ctx = graph.dist
    if not ctx.enabled:
        return {}
    local = distributed.gather_states(graph.local_generator.get_state(), graph.device)
    if not ctx.is_main:
        return None
    return {f"rng.local.rank{r}": local[r] for r in range(ctx.world_size)}


def _restore_generators(graph, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """The data and batch streams (the same on every rank; a checkpoint from before the shared
    streams gives rank 0's), and this rank's local stream: its own state when the checkpoint has
    one (the same process count), else seeded from its rank and the step."""
    graph.data_generator.set_state(tensors["rng.data"])
    graph.generator.set_state(tensors["rng.train"])
    if graph.local_generator is None:
        return
    key = f"rng.local.rank{graph.dist.rank}"
    if key in tensors and state.get("world_size", 1) == graph.dist.world_size:
        graph.local_generator.set_state(tensors[key])
    else:
        graph.local_generator.manual_seed(distributed.local_seed(graph.spec.train.seed + 7919 * int(state["step"]),
                                                                 graph.dist.rank))


def check_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path,
                 expected: dict[str, torch.Tensor] | None = None) -> dict:
    """The ``prefix.*`` tensors as the module's state (``expected``: its names, shapes and dtypes,
    by default its state dict's); mismatches are one-line errors naming parameters."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict() if expected is None else expected
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
    return state




def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Load ``prefix.*`` tensors into a module (checked by :func:`check_module`)."""
    module.load_state_dict(check_module(module, tensors, prefix, source))


def size_limit(module: torch.nn.Module) -> int:
    """The most bytes a checkpoint of ``module`` can hold: model, EMA and two optimizer moments per
    parameter, in float64 at most, twice over, plus room for generator states and metadata."""
    count = sum(t.numel() for t in module.state_dict().values())
    return 8 * 8 * count + (64 << 20)
