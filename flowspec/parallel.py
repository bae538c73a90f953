"""PyTorch's data-parallel engines around the loss (flowspec.distributed tells where this process sits).

The objective's loss of one (micro-)batch is a module, :class:`LossModule`: ``forward(batch, s, t,
n_diag)`` returns the objective's :class:`LossOutput`, with the flow map (its one submodule, so its
parameters are the ones the engines see), the objective, the interpolant and the teacher. Every
network pass of the objective runs inside that forward, forward-mode jvps included. With several
processes (``train.parallel``):

* ``"ddp"``: the loss module wrapped in ``DistributedDataParallel`` (``gradient_as_bucket_view``,
  ``train.ddp_bucket_mb``; ``train.ddp_comm = "bf16"`` registers ``bf16_compress_hook``). DDP's
  hooks sit on each parameter's gradient accumulator, which runs once per backward whatever paths
  the gradient took to it (the tangent of a jvp, a stop-gradient teacher that is the model itself,
  several calls of the map): the average over the ranks is that of one process's gradient on the
  combined batch (tests/test_parallel.py, max difference 0.0 against an explicit all-reduce).
  ``find_unused_parameters`` stays off: every parameter of the flow map takes part in every loss.
* ``"fsdp"``: FSDP2, ``fully_shard`` of each unit the network lists (``fsdp_units()``: the U-Net's
  blocks), then of the network and of the learned loss weight; parameters, gradients and optimizer
  state are sharded (DTensors), each unit's weights all-gathered for its forward. Mixed precision:
  the parameters keep their dtype (``train.precision = "bf16"`` autocasts the forward passes, and
  the jvps, which switch autocast off, run in float32 as in one process); ``ddp_comm = "bf16"``
  reduce-scatters gradients in bfloat16. FSDP2 cannot shard 0-dimensional parameters: those (the
  U-Net's gains) are held as (1,) while sharded, and every state this module hands out (the
  checkpoint's, the EMA's) has the network's own shapes.

The EMA stays one full copy on every rank (the teacher, evaluation and checkpoints read it);
with fsdp it is updated from the all-gathered parameters, one all-gather per step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flowspec.distributed import Context
from flowspec.flowmap import FlowMap
from flowspec.objectives.base import Batch, LossOutput


class LossModule(nn.Module):
    """The objective's loss as a module: ``forward(batch, s, t, n_diag)`` is
    ``objective.loss_at(flow_map, interpolant, teacher, batch, s, t, n_diag)``. With
    ``train.compile`` :func:`wrap` compiles it whole (``nn.Module.compile``), forward-mode jvps
    included: LSD's and ESD's losses trace to one graph each (tests/test_compile_loss.py)."""

    def __init__(self, flow_map: FlowMap, objective, interpolant, teacher):
        super().__init__()
        self.flow_map = flow_map
        # a tuple, not attributes: never registered as submodules (a teacher may hold the flow map
        # itself or its EMA copy, whose parameters are no business of DDP or the optimizer)
        self.parts = (objective, interpolant, teacher)

    def forward(self, batch: Batch, s: torch.Tensor, t: torch.Tensor, n_diag: int) -> LossOutput:
        objective, interpolant, teacher = self.parts
        return objective.loss_at(self.flow_map, interpolant, teacher, batch, s, t, n_diag)


def wrap(o, flow_map: FlowMap, objective, interpolant, teacher, ctx: Context) -> nn.Module:
    """The loss module a step calls: plain with one process, else DDP around it or (fsdp) the flow
    map sharded in place. Call before building the optimizer (fsdp replaces the parameters)."""
    loss = LossModule(flow_map, objective, interpolant, teacher)
    if o.compile:  # the whole loss, jvps included, as one graph (flowspec.jvp traces without breaks)
        loss.compile()
    if not ctx.enabled:
        return loss
    if o.parallel == "fsdp":
        shard(flow_map, o.ddp_comm)
        return loss
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    # forward_sync_buffers off: the networks' buffers are constants, made equal once here
    ddp = nn.parallel.DistributedDataParallel(loss, bucket_cap_mb=o.ddp_bucket_mb, gradient_as_bucket_view=True,
                                              find_unused_parameters=False, forward_sync_buffers=False)
    if o.ddp_comm == "bf16":
        ddp.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
    return ddp


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (gradients accumulate locally, no communication); a no-op otherwise (FSDP
    reduce-scatters each micro-batch into its sharded gradients: less memory than holding them whole)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


# -- FSDP2 ----------------------------------------------------------------------------------------

def shard(flow_map: FlowMap, comm: str = "fp32") -> None:
    """FSDP2 over the flow map, in place: each of ``net.fsdp_units()``, then the network and the
    learned loss weight. 0-dimensional parameters become (1,) (:func:`shapes` keeps their own)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _tangents_as_views()
    # inside a jvp every output is a dual tensor, which reads as a view: FSDP2 then warns at each
    # pass that an in-place op on it would skip its hook; no flowspec code changes a network's
    # output in place (the flow map and the objectives build new tensors), so the warning says nothing
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor",
                            category=UserWarning)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if comm == "bf16" else None)
    own: dict[str, torch.Size] = {}
    for name, p in flow_map.named_parameters():
        if p.dim() == 0:
            own[name] = p.shape
            p.data = p.data.reshape(1)
    units = getattr(flow_map.net, "fsdp_units", None)
    for unit in units() if units is not None else []:
        fully_shard(unit, mp_policy=policy)
    fully_shard(flow_map.net, mp_policy=policy)
    if flow_map.log_weight is not None:
        fully_shard(flow_map.log_weight, mp_policy=policy)
    flow_map.fsdp_shapes = own


def sharded(module: nn.Module) -> bool:
    return getattr(module, "fsdp_shapes", None) is not None


def _own(flow_map: FlowMap) -> dict[str, torch.Size]:
    return flow_map.fsdp_shapes or {}


def _full(value: Any, shape: torch.Size | None = None) -> Any:
    """A DTensor all-gathered (a collective: every rank calls it, in the same order), in ``shape``."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.reshape(shape) if shape is not None else value


def full_parameters(flow_map: FlowMap) -> Iterator[torch.Tensor]:
    """The flow map's parameters, whole and in the network's shapes (all-gathered when sharded)."""
    if not sharded(flow_map):
        yield from flow_map.parameters()
        return
    own = _own(flow_map)
    for name, p in flow_map.named_parameters():
        yield _full(p.detach(), own.get(name))


def _gathered(items, shape_of, keep: bool) -> dict:
    """Each value whole (all-gathered, one at a time) and moved to the CPU when ``keep``, else
    gathered and dropped (a rank that writes nothing keeps no whole copy)."""
    out = {}
    for k, v in items:
        v = _full(v, shape_of(k))
        if keep:
            out[k] = v.cpu()
    return out


def _sharded_value(value: Any, name: str, own: dict[str, torch.Size]) -> bool:
    """A DTensor in its parameter's own shape: what :func:`shards` hands to the checkpoint's DCP
    part (not the 0-dimensional parameters held as (1,), which go whole into its file)."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor) and name not in own


def model_state(flow_map: FlowMap, keep: bool = True, whole: bool = True) -> dict[str, torch.Tensor]:
    """``state_dict()``, whole and in the network's shapes (when sharded: a collective, on the CPU;
    empty unless ``keep``; without ``whole``, less what :func:`shards` holds)."""
    state = flow_map.state_dict()
    if not sharded(flow_map):
        return state
    own = _own(flow_map)
    return _gathered(((k, v) for k, v in state.items() if whole or not _sharded_value(v, k, own)), own.get, keep)


def shards(flow_map: FlowMap, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded state, by checkpoint tensor name, as this rank's DTensors (no communication):
    ``model.<name>`` of each sharded parameter and ``optim.<i>.<slot>`` of its optimizer moments
    ({} unless sharded; flowspec.shards writes them with torch.distributed.checkpoint)."""
    if not sharded(flow_map):
        return {}
    own = _own(flow_map)
    out = {f"model.{k}": v for k, v in flow_map.state_dict().items() if _sharded_value(v, k, own)}
    for i, (name, p) in enumerate(flow_map.named_parameters()):
        for slot, value in optimizer.state.get(p, {}).items():
            if _per_element(slot, value) and _sharded_value(value, name, own):
                out[f"optim.{i}.{slot}"] = value
    return out


def shard_layout(flow_map: FlowMap) -> dict[str, Any]:
    """What each name :func:`shards` may hold is loaded like: the parameter (a DTensor when
    sharded; whole otherwise), for ``model.<name>`` and for its optimizer moments ``optim.<i>.*``."""
    state = flow_map.state_dict()
    like = {f"model.{k}": v for k, v in state.items()}
    return like | {f"optim.{i}": state[name] for i, (name, _) in enumerate(flow_map.named_parameters())}


def expected_state(flow_map: FlowMap) -> dict[str, torch.Tensor]:
    """The names, shapes and dtypes of :func:`model_state` (meta tensors when sharded; no communication)."""
    state = flow_map.state_dict()
    if not sharded(flow_map):
        return state
    own = _own(flow_map)
    return {k: torch.empty(own.get(k, v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}


def _local(full: torch.Tensor, like: Any) -> Any:
    """This rank's shard of ``full`` laid out like the DTensor ``like`` (no communication: every rank
    holds ``full``); ``full`` itself when ``like`` is no DTensor, or when ``full`` is a DTensor
    (loaded from the checkpoint's shards in this layout, flowspec.shards)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(full, DTensor):  # a DTensor: laid out like ``like`` already
        return full
    return distribute_tensor(full.reshape(like.shape).to(like.device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def load_model_state(flow_map: FlowMap, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` of a :func:`model_state`; each rank keeps its shard when sharded."""
    if not sharded(flow_map):
        flow_map.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor

    current = flow_map.state_dict()
    with torch.no_grad():
        for k, v in current.items():
            if isinstance(v, DTensor):
                v.to_local().copy_(_local(state[k], v).to_local())
            else:
                v.copy_(state[k])


def optimizer_state(optimizer: torch.optim.Optimizer, flow_map: FlowMap, keep: bool = True,
                    whole: bool = True) -> dict:
    """``optimizer.state_dict()`` with whole tensors in the parameters' own shapes (when sharded: a
    collective, on the CPU, empty unless ``keep``; without ``whole``, less what :func:`shards`
    holds; the optimizer was built on ``flow_map.parameters()``, in order)."""
    state = optimizer.state_dict()
    if not sharded(flow_map):
        return state
    own = _own(flow_map)
    names = [n for n, _ in flow_map.named_parameters()]
    slots = {i: _gathered(((k, v) for k, v in slot.items() if _per_element(k, v)
                           and (whole or not _sharded_value(v, names[i], own))), lambda _, i=i: own.get(names[i]), keep)
             for i, slot in state["state"].items()}
    return {"param_groups": state["param_groups"],
            "state": {i: {**{k: v for k, v in slot.items() if not _per_element(k, v)}, **slots[i]}
                      for i, slot in state["state"].items()}}


def _per_element(key: str, value: Any) -> bool:
    """An optimizer slot shaped like its parameter (the moments; not the step count)."""
    return torch.is_tensor(value) and key != "step"


def load_optimizer_state(optimizer: torch.optim.Optimizer, flow_map: FlowMap, state: dict) -> None:
    """``optimizer.load_state_dict`` of an :func:`optimizer_state`; each rank keeps its shards."""
    if sharded(flow_map):
        params = list(flow_map.parameters())
        state = {"param_groups": state["param_groups"],
                 "state": {i: {k: _local(v, params[int(i)]) if _per_element(k, v) else v
                               for k, v in slots.items()} for i, slots in state["state"].items()}}
    optimizer.load_state_dict(state)


def replicated(value: torch.Tensor) -> torch.Tensor:
    """A reduced DTensor (the gradient norm of sharded gradients) as a plain tensor."""
    return _full(value)


_PATCHED: list[bool] = []


def _tangents_as_views() -> None:
    """Forward-mode AD through FSDP2's units. FSDP2 passes a unit's inputs through an autograd
    Function (RegisterPostBackwardFunction) that returns them as they are; its forward-AD rule
    returns their tangents as they are too, which PyTorch 2.13 refuses for a dual input that
    requires grad (every activation inside a jvp): "A custom Function's forward is returning a view
    (or an input as-is) but the jvp is not returning a view". The rule is replaced by one returning
    views of the tangents (the same values), only where a probe shows the refusal."""
    if _PATCHED:
        return
    import torch.autograd.forward_ad as fwAD
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    fn = group.RegisterPostBackwardFunction
    w = torch.ones(1, requires_grad=True)
    try:
        with fwAD.dual_level():
            fn.apply(None, fwAD.make_dual(torch.ones(1), torch.ones(1)) * w)
    except RuntimeError as exc:
        if "jvp is not returning a view" not in str(exc):
            raise
        views = staticmethod(lambda ctx, _group, *tangents: tuple(u.view_as(u) for u in tangents))
        setattr(fn, "jvp", views)  # noqa: B010 (a method replaced)
    _PATCHED.append(True)
