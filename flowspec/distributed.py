"""Data-parallel training over torch.distributed: ``torchrun --nproc_per_node N -m flowspec run SPEC``
(or ``flowspec run --nproc N SPEC``), one process per device, on one machine or many.

Each of the W processes (ranks) draws its own B / W samples (B = ``train.batch_size``) from
generators seeded with the rank (rank 0 draws exactly what a single process would), computes the
loss on them, and after the backward pass the gradients are averaged over the ranks:

    g = (1 / W) sum_r grad L_r,   L_r = (sum of the terms of rank r's samples) / (B / W),

which is the gradient of the loss of one step on the combined batch of B samples. Every rank then
takes the same clipped optimizer step on the same weights (they start identical: rank 0's are
broadcast), so the weights, the EMA and the non-finite-step decisions stay in lockstep.

Why not wrap the model in ``DistributedDataParallel``: the objectives call the flow map several
times per step and take forward-mode jvps (flowspec.jvp) on the plain module, while DDP
expects exactly one forward through its wrapper before each backward (its reducer's bookkeeping).
The gradients are averaged explicitly instead, in one flattened all-reduce per step, which is what
DDP's buckets compute, without the overlap with the backward pass.

Only rank 0 writes the run folder. Evaluation samples are split across the ranks and gathered on
rank 0, which computes the metrics. The backend is NCCL when every local rank has its own GPU,
else gloo (CPU runs, or several ranks sharing one GPU).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flowspec.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device`` as a device; with several processes on a machine, CUDA device local_rank
    (mod the count)."""
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


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank r of W, local rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without a launcher), before joining the group."""
    return int(os.environ.get("RANK", "0"))


def backend(device_type: str) -> str:
    """nccl when training on CUDA with a GPU per local rank; gloo otherwise."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def init(device_type: str) -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) if not already."""
    if not dist.is_initialized():
        chosen = backend(device_type)
        if chosen == "nccl":  # each process on its own GPU before NCCL picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=30))
        # leave the group at exit, also after an error or a signal: a process that exits with the
        # group's threads still running aborts ("terminate called without an active exception")
        atexit.register(_leave)
    return current()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Context:
    """This process's context (single process when no group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def _comm_device(ctx_device: torch.device) -> torch.device:
    """Collectives run on the GPU for NCCL, on the CPU for gloo."""
    return ctx_device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    for tensor in module.state_dict().values():
        if dist.get_backend() == "nccl" or tensor.device.type == "cpu":
            dist.broadcast(tensor, 0)
        else:
            cpu = tensor.cpu()
            dist.broadcast(cpu, 0)
            tensor.copy_(cpu)


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """grad <- (1 / W) sum over ranks of grad, in one flattened all-reduce. A parameter without a
    gradient on this rank counts as a zero gradient (every rank then holds the same gradients)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device
    comm = _comm_device(device)
    flat = torch.cat([g.reshape(-1).to(comm) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).to(device)
        offset += n


def all_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The mean over ranks of each scalar (for logging the loss of the whole batch)."""
    if not values:
        return values
    names = list(values)
    flat = torch.stack([torch.as_tensor(values[n]).detach().double().reshape(()).cpu() for n in names])
    flat = flat.to(_comm_device(device))
    dist.all_reduce(flat)
    flat = flat.cpu() / dist.get_world_size()
    return {n: flat[i] for i, n in enumerate(names)}


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop signal seen by one)."""
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_text(text: str | None, device: torch.device) -> str:
    """Rank 0's ``text`` on every rank (e.g. the run folder's path), as UTF-8 bytes (no pickling)."""
    comm = _comm_device(device)
    data = torch.tensor(list((text or "").encode()) if dist.get_rank() == 0 else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=comm)
    dist.broadcast(size, 0)
    buf = data.to(comm) if dist.get_rank() == 0 else torch.empty(int(size.item()), dtype=torch.uint8, device=comm)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


def gather_rows(x: torch.Tensor, total: int, device: torch.device) -> torch.Tensor | None:
    """Rank r holds rows part r of ``torch.arange(total).tensor_split(W)``; returns the (total, ...)
    concatenation in rank order on rank 0 (CPU), None elsewhere."""
    w = dist.get_world_size()
    size = -(-total // w)
    comm = _comm_device(device)
    pad = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=comm)
    pad[: x.shape[0]] = x.to(comm)
    parts = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(parts, pad)
    if dist.get_rank() != 0:
        return None
    counts = [len(c) for c in torch.arange(total).tensor_split(w)]
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def gather_states(state: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's uint8 state tensor (same size on all ranks), in rank order, on every rank."""
    comm = _comm_device(device)
    s = state.to(comm)
    parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, s)
    return [p.cpu() for p in parts]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
