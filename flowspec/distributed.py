"""Data-parallel training over torch.distributed: ``torchrun --nproc_per_node N -m flowspec run SPEC``
(or ``flowspec run --nproc N SPEC``), one process per device, on one machine or many.

The data order and the random streams do not depend on the process count W (nor on the
micro-batch count N = ``train.grad_accum``). Every rank draws the whole step's batch of B samples
(``train.batch_size``) from the same two generators, seeded from ``train.seed`` as one process
seeds them: the data stream (x1) and the batch stream (x0, then the times (s, t)). The batch is then
cut into W N chunks of B / (W N) samples, each with an equal share (to one sample) of the diagonal
ones (flowspec.engine.split); rank r computes chunks r N, ..., r N + N - 1, and the gradients are
averaged over the ranks by PyTorch's engines (flowspec.parallel):

    g = (1 / W N) sum_chunks grad L_c,   L_c = (sum of the terms of chunk c) / (B / (W N)),

the gradient of the loss of one step on the whole batch. Every rank takes the same clipped step on
the same weights (made equal at the start), so the weights, the EMA and the non-finite-step
decisions (one flag reduced over the ranks) stay in lockstep. Any W and N thus train on the same
samples at the same times: a run resumed with another process count continues exactly where the
math allows (the sums are reduced in another order: equal to rounding). Random numbers drawn
during the loss itself (a residual's, such as PSD-U's split points; dropout) come from a stream of
each rank's own (``local`` seeds) with more than one process: their values depend on the split, so
a step that drew any makes the run's checkpoints refuse another process count (flowspec.checkpoint).

Only rank 0 writes the run folder. Evaluation samples are split across the ranks and gathered on
rank 0, which computes the metrics. The backend is NCCL when every local rank has its own GPU,
else gloo (CPU runs, or several ranks sharing one GPU).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
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


def stream_seeds(seed: int) -> tuple[int, int]:
    """(data seed, batch seed): the generators every rank draws the whole batch from."""
    return seed + 1, seed + 2


#: rank r's local stream is seeded with seed + 3 + r * RANK_STRIDE (several processes only: one
#: process draws everything from the batch stream)
RANK_STRIDE = 1_000_003


def local_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s local stream (random numbers drawn during its loss)."""
    return seed + 3 + rank * RANK_STRIDE


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


def backend(device_type: str, local: int | None = None) -> str:
    """nccl when training on CUDA with a GPU per local rank (``local`` ranks on this machine, by
    default as the launcher says); gloo otherwise."""
    if local is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def split_problems(o, world_size: int, chosen: str, eta: float = 0.0) -> list[str]:
    """What keeps ``[train]`` options ``o`` from running on ``world_size`` processes over backend
    ``chosen`` (``eta``: the objective's diagonal fraction): one line each (none for one process;
    the batch's split into micro-batches alone is a spec check, flowspec.checks)."""
    if world_size <= 1:
        return []
    lines = []
    n = world_size * o.grad_accum
    if o.batch_size % n:
        over = f"{world_size} processes" + (f" x {o.grad_accum} micro-batches" if o.grad_accum > 1 else "")
        lines.append(f"train.batch_size: {o.batch_size} samples do not split evenly over {over} "
                     f"(valid: a multiple of {n})")
    diagonal = int(round(eta * o.batch_size))  # as the objective's sample_times counts them
    if o.parallel == "fsdp" and (0 < diagonal < n or 0 < o.batch_size - diagonal < n):
        # FSDP2 communicates per network pass: every process must make the same passes
        lines.append(f'train.parallel: "fsdp" needs the same network passes on every process, so diagonal and '
                     f'other samples in each of the {n} chunks: objective.diagonal_fraction = {eta:g} of '
                     f"train.batch_size = {o.batch_size} gives {diagonal} and {o.batch_size - diagonal} "
                     f"(valid: at least {n} of each, or none)")
    if o.ddp_comm == "bf16" and chosen != "nccl":
        lines.append(f'train.ddp_comm: "bf16" needs the NCCL backend (a GPU per process); this run uses {chosen} '
                     '(valid: "fp32")')
    if o.parallel == "fsdp" and o.compile:
        lines.append('train.compile: not with train.parallel = "fsdp" (compiled FSDP2 units are untested here; '
                     'valid: false, or parallel = "ddp")')
    return lines


def init(device_type: str) -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) if not already."""
    if not dist.is_initialized():
        chosen = backend(device_type)
        if chosen == "nccl":  # each process on its own GPU before NCCL picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=30))
        # leave the group at exit, also after an error or a signal: a process that exits with the
        # group's threads still running aborts ("terminate called without an active exception");
        # a rank started by `flowspec run` leaves earlier, then skips the teardown (cli._end_rank)
        atexit.register(leave)
    return current()


def leave() -> None:
    """Leave the process group (if joined): the references that keep DDP's reducer and FSDP's
    state alive are collected first, so that nothing uses the group after it ends."""
    if dist.is_initialized():
        gc.collect()  # DDP's reducer and FSDP's state in reference cycles end before the group they use
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


def max_flag(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The maximum over the ranks of a one-element tensor (no host sync on NCCL: the caller's
    read of the result is the one sync)."""
    t = flag.reshape(1).to(_comm_device(device), torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


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
