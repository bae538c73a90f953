"""PyTorch's engines over two gloo processes (flowspec.parallel), in float64 against one process on
the whole batch: DDP around the loss (the average of its buckets is exactly an explicit all-reduce's;
whole steps equal one process's), gradient accumulation under no_sync, the non-finite flag reduced
over the ranks, FSDP2 through the jvp, and checkpoints resumed with another process count."""

from __future__ import annotations

import faulthandler
import gc
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from flowspec import checkpoint, distributed, engine, parallel
from flowspec.cli import _end_rank
from flowspec.compile import compile_spec
from flowspec.errors import UserError
from flowspec.metrics import FeatureMetric
from flowspec.spec import validate

UNET = {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attention_resolutions": [4],
        "channels_per_head": 4, "embedding_dim": 8}
#: the objectives of the issue: LSD, ESD (both stop-gradient forms), PSD (midpoint: PSD-U's split
#: points come from each rank's own stream) and FMM, and LSD with the learned loss weight
OBJECTIVES = {
    "lsd": {"characterization": "lagrangian"},
    "esd": {"characterization": "eulerian"},
    "esd-none": {"characterization": "eulerian", "stop_gradient": "none"},
    "psd": {"characterization": "progressive", "gamma": "half"},
    "fmm": {"characterization": "fmm", "target": "conditional"},
    "lsd-learned": {"characterization": "lagrangian", "learned_weight": True},
}
#: PSD-U draws its split points during the loss: from each rank's own stream with several processes
DRAWS = {"psd-u": {"characterization": "progressive", "gamma": "uniform"}}
STEPS = 3


def spec(objective: str, **train) -> dict:
    return {"data": {"kind": "digits"}, "interpolant": {"kind": "linear", "base_scale": 0.5}, "network": UNET,
            "objective": {**{**OBJECTIVES, **DRAWS}[objective], "diagonal_fraction": 0.4},
            "train": {"steps": 10, "batch_size": 8, "precision": "float64", "lr": 1e-2, "ema": 0.5,
                      "device": "cpu", **train},
            "eval": {"metrics": [], "num_samples": 4, "steps": [1]}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, out_dir: Path, *args) -> None:
    mp.spawn(_entry, args=(_free_port(), fn, str(out_dir), *args), nprocs=2, join=True)


def _entry(rank: int, port: int, fn, out_dir: str, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    faulthandler.enable()  # a crash in a rank prints its Python stack (pytest's covers only its own process)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, Path(out_dir), *args)
        dist.barrier()  # no rank tears down while another still communicates
    except BaseException:
        distributed.leave()
        raise
    # done, its files written: leave and exit as a rank of `flowspec run` does, without the
    # interpreter's teardown, where the backends' threads now and then crashed a rank
    _end_rank(0)


def _state(graph) -> dict[str, torch.Tensor]:
    """The model (whole, also when sharded) and the EMA."""
    state = {f"model.{k}": v.clone() for k, v in parallel.model_state(graph.model).items()}
    return {**state, **{f"ema.{k}": v.clone() for k, v in graph.ema.model.state_dict().items()}}


def _single(objective: str, steps: int = STEPS, **train) -> dict[str, torch.Tensor]:
    graph = compile_spec(validate(spec(objective, **train)))
    for _ in range(steps):
        engine.step(graph)
    return _state(graph)


def _close(a: dict, b: dict, atol: float = 1e-12) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


# -- DDP ---------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, out: Path, names: list[str]) -> None:
    results = {}
    for name in names:
        graph = compile_spec(validate(spec(name)))
        assert isinstance(graph.loss_module, torch.nn.parallel.DistributedDataParallel)
        for _ in range(STEPS - 1):
            engine.step(graph)
        # the next step's gradients through DDP, and through the bare loss module plus an explicit
        # all-reduce of every gradient, from the same draws
        streams = [g.get_state() for g in (graph.data_generator, graph.generator, graph.local_generator)]
        graph.optimizer.zero_grad(set_to_none=True)
        engine.backward(graph)
        ddp = [p.grad.clone() for p in graph.model.parameters()]
        for g, s in zip((graph.data_generator, graph.generator, graph.local_generator), streams):
            g.set_state(s)
        wrapped, graph.loss_module = graph.loss_module, graph.loss_module.module
        graph.optimizer.zero_grad(set_to_none=True)
        engine.backward(graph)
        graph.loss_module = wrapped
        for p, d in zip(graph.model.parameters(), ddp):
            g = p.grad.clone()
            dist.all_reduce(g)
            assert torch.equal(d, g / 2), name  # max difference 0.0
        for g, s in zip((graph.data_generator, graph.generator, graph.local_generator), streams):
            g.set_state(s)
        engine.step(graph)
        assert graph.split_free
        results.update({f"{name}.{k}": v for k, v in _state(graph).items()})
        del graph, wrapped
        gc.collect()  # this graph's DDP reducer ends here, on both ranks alike
    # two micro-batches per rank under no_sync
    graph = compile_spec(validate(spec("lsd", grad_accum=2)))
    for _ in range(STEPS):
        engine.step(graph)
    results.update({f"accum.{k}": v for k, v in _state(graph).items()})
    save_file(results, str(out / f"rank{rank}.safetensors"))


def _check(tmp_path: Path, worker, names: list[str], single: dict[str, str]) -> None:
    """Run ``worker`` on 2 ranks; the ranks' states agree exactly, and each run ``name`` (with
    ``single[name]`` naming its one-process objective) equals one process on the whole batch."""
    _spawn(worker, tmp_path, names)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the ranks stay in lockstep
    for name, objective in single.items():
        mine = {k[len(name) + 1:]: v for k, v in ranks[0].items() if k.startswith(name + ".")}
        _close(mine, _single(objective))


def _check_ddp(tmp_path: Path, names: list[str]) -> None:
    _check(tmp_path, _ddp_worker, names, {**{n: n for n in names}, "accum": "lsd"})
    moved = _close(_single("lsd"), _single("lsd", STEPS - 1), atol=float("inf"))
    assert moved > 1e-4  # a step is measurably different: the comparisons can fail


def test_ddp_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    _check_ddp(tmp_path, ["lsd-learned"])


# slow (all six objectives, ~10 s on two idle cores): the default tier keeps LSD with the learned weight above
@pytest.mark.slow
def test_ddp_equals_one_process_for_every_objective(tmp_path):
    _check_ddp(tmp_path, list(OBJECTIVES))


def _mlp_spec(**train) -> dict:
    return {"data": {"kind": "checkerboard"}, "interpolant": {"kind": "linear"},
            "network": {"kind": "mlp", "width": 32, "depth": 2},
            "objective": {"characterization": "lagrangian", "diagonal_fraction": 0.5},
            "train": {"steps": 10, "batch_size": 16, "precision": "float64", "lr": 1e-2, "ema": 0.5,
                      "device": "cpu", **train},
            "eval": {"metrics": [], "num_samples": 4, "steps": [1]}}


def _compiled_ddp_worker(rank: int, out: Path) -> None:
    graph = compile_spec(validate(_mlp_spec(compile=True)))
    assert isinstance(graph.loss_module, torch.nn.parallel.DistributedDataParallel)
    assert graph.loss_module.module._compiled_call_impl is not None  # DDP around the compiled loss, jvp inside
    for _ in range(STEPS):
        engine.step(graph)
    save_file(_state(graph), str(out / f"rank{rank}.safetensors"))


# slow (inductor compiles the LSD loss in each rank, ~25 s): train.compile under DDP
@pytest.mark.slow
def test_ddp_around_the_compiled_loss_equals_one_eager_process(tmp_path):
    _spawn(_compiled_ddp_worker, tmp_path)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    graph = compile_spec(validate(_mlp_spec()))
    for _ in range(STEPS):
        engine.step(graph)
    _close(ranks[0], _state(graph), atol=1e-12)  # measured 5.6e-17


def test_gradient_accumulation_equals_one_pass_on_the_whole_batch():
    for name in ("lsd", "fmm"):
        _close(_single(name, grad_accum=4), _single(name))


def test_split_gives_every_chunk_its_share_of_the_diagonal():
    from flowspec.objectives.base import Batch

    x = torch.arange(12.0)[:, None]
    s = t = torch.arange(12.0)
    chunks = engine.split(Batch(x, x), s, t, 5, 4, None)  # 5 diagonal samples of 12, in 4 chunks
    assert [(len(c[1]), c[3]) for c in chunks] == [(3, 2), (3, 1), (3, 1), (3, 1)]
    assert sorted(torch.cat([c[1] for c in chunks]).tolist()) == s.tolist()  # every sample once
    assert all(c[1][: c[3]].max() < 5 <= c[1][c[3]:].min() for c in chunks)  # diagonal ones first


# -- the non-finite flag ------------------------------------------------------------------------------

def _fault_worker(rank: int, out: Path) -> None:
    graph = compile_spec(validate(spec("lsd", nonfinite="skip", precision="float64")))
    engine.step(graph)
    loss_at = graph.objective.loss_at

    def poisoned(*args):
        """Rank 1's loss non-finite, its gradient not: only the reduced flag tells rank 0."""
        result = loss_at(*args)
        if rank == 1 and graph.step_count == 1:
            result.loss = result.loss + float("nan") * result.loss.detach()
        return result

    graph.objective.loss_at = poisoned
    before = _state(graph)
    engine.step(graph)
    assert graph.last_fault == ("rank 1" if rank == 0 else "loss")
    _close(_state(graph), before, atol=0.0)  # neither rank stepped
    engine.step(graph)
    assert graph.last_fault is None
    save_file(_state(graph), str(out / f"rank{rank}.safetensors"))


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    _spawn(_fault_worker, tmp_path)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


# -- FSDP2 -------------------------------------------------------------------------------------------

def _fsdp_worker(rank: int, out: Path, names: list[str]) -> None:
    from torch.distributed.tensor import DTensor

    results = {}
    for name in names:
        graph = compile_spec(validate(spec(name, parallel="fsdp")))
        assert any(isinstance(p, DTensor) for p in graph.model.parameters())
        for _ in range(STEPS):
            engine.step(graph)
        results.update({f"{name}.{k}": v for k, v in _state(graph).items()})
        del graph
        gc.collect()  # this graph's FSDP state ends here, on both ranks alike, not during the next one's steps
    save_file(results, str(out / f"rank{rank}.safetensors"))


def _check_fsdp(tmp_path: Path, names: list[str]) -> None:
    _check(tmp_path, _fsdp_worker, names, {n: n for n in names})


def test_fsdp2_two_ranks_equal_one_process_through_the_jvp(tmp_path):
    _check_fsdp(tmp_path, ["esd-none"])  # the jvp's tangent carries gradients to every block


# slow (all six objectives, ~12 s on two idle cores): the default tier keeps ESD without stop-gradient above
@pytest.mark.slow
def test_fsdp2_equals_one_process_for_every_objective(tmp_path):
    _check_fsdp(tmp_path, list(OBJECTIVES))


# -- resuming with another process count ----------------------------------------------------------------

def _resume_worker(rank: int, out: Path) -> None:
    # 2 -> 1: two steps with two processes (ddp, and fsdp), checkpointed for one process to continue
    for mode in ("ddp", "fsdp"):
        graph = compile_spec(validate(spec("lsd", parallel=mode)))
        for _ in range(2):
            engine.step(graph)
            checkpoint.save(graph, out / f"two-{mode}")
    # 1 -> 2: continue one process's checkpoint for two steps, with ddp and with fsdp
    for mode in ("ddp", "fsdp"):
        graph = compile_spec(validate(spec("lsd", parallel=mode)))
        checkpoint.restore(graph, out / "one" / "checkpoints" / "step-00000002.safetensors")
        for _ in range(2):
            engine.step(graph)
        state = _state(graph)  # every rank: all-gathers with fsdp
        if rank == 0:
            save_file(state, str(out / f"one-two-{mode}.safetensors"))
    # 2 -> 2 from the sharded checkpoint: each rank loads its shards (DCP), continued with fsdp and with ddp
    for mode in ("fsdp", "ddp"):
        graph = compile_spec(validate(spec("lsd", parallel=mode)))
        checkpoint.restore(graph, out / "two-fsdp" / "checkpoints" / "step-00000002.safetensors")
        for _ in range(2):
            engine.step(graph)
        state = _state(graph)
        if rank == 0:
            save_file(state, str(out / f"two-two-{mode}.safetensors"))
    # a run whose residual draws random numbers (PSD-U's split points) keeps its process count
    graph = compile_spec(validate(spec("psd-u")))
    with pytest.raises(checkpoint.Refused) as info:
        checkpoint.restore(graph, out / "psd-one" / "checkpoints" / "step-00000001.safetensors")
    assert info.value.lines == [f"{out / 'psd-one'}: trained with 1 process, resumed with 2: its steps drew random "
                                "numbers that depend on the split over processes (a residual's or dropout's), so "
                                "the result would differ; resume with one process (no --nproc)"]
    engine.step(graph)
    assert not graph.split_free
    checkpoint.save(graph, out / "psd-two")


def test_resume_across_process_counts_is_exact_where_the_math_allows(tmp_path):
    graph = compile_spec(validate(spec("lsd")))
    for _ in range(2):
        engine.step(graph)
    checkpoint.save(graph, tmp_path / "one")
    psd = compile_spec(validate(spec("psd-u")))
    engine.step(psd)
    checkpoint.save(psd, tmp_path / "psd-one")
    _spawn(_resume_worker, tmp_path)
    reference = _single("lsd", 4)
    # the sharded run's checkpoint: its parameters and moments in DCP's files, the EMA whole in the file
    folder = tmp_path / "two-fsdp" / "checkpoints"
    shards = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [p.name.split(".")[0] for p in shards] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in shards[1].iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    names = load_file(str(folder / "step-00000002.safetensors")).keys()
    gains = {n for n, p in compile_spec(validate(spec("lsd"))).model.named_parameters() if p.dim() == 0}
    assert {n[len("model."):] for n in names if n.startswith("model.")} == gains  # held as (1,) while sharded
    assert any(n.startswith("ema.") for n in names)
    for name in ("one-two-ddp", "one-two-fsdp", "two-two-fsdp", "two-two-ddp"):
        _close(load_file(str(tmp_path / f"{name}.safetensors")), reference)
    for mode in ("ddp", "fsdp"):
        graph = compile_spec(validate(spec("lsd")))
        checkpoint.restore(graph, tmp_path / f"two-{mode}" / "checkpoints" / "step-00000002.safetensors")
        for _ in range(2):
            engine.step(graph)
        _close(_state(graph), reference)
    psd = compile_spec(validate(spec("psd-u")))
    with pytest.raises(checkpoint.Refused, match=r"trained with 2 processes, resumed with 1: its steps drew .* "
                                                 r"resume with --nproc 2$"):
        checkpoint.restore(psd, tmp_path / "psd-two" / "checkpoints" / "step-00000001.safetensors")
    _sharded_checkpoints_are_verified(tmp_path / "two-fsdp", shards)


def _sharded_checkpoints_are_verified(run: Path, shards: list[Path]) -> None:
    """A damaged shard makes its checkpoint damaged (the previous one is taken, with one warning); a
    folder that no checkpoint names (a write cut short) is removed; pruning takes the folders too."""
    warnings: list[str] = []
    damaged = shards[1] / "__1_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    graph = compile_spec(validate(spec("lsd")))
    resumed = checkpoint.newest(run, warnings.append, checkpoint.UNBOUNDED,
                                accept=lambda ckpt: checkpoint.restore(graph, ckpt))
    assert resumed.state["step"] == graph.step_count == 1
    assert warnings == [f"warning: {damaged}: checksum mismatch: the checkpoint's shard is truncated or corrupted; "
                        "skipped for the previous checkpoint"]
    newest = run / "checkpoints" / "step-00000002.safetensors"
    # the EMA alone (sampling, a teacher) reads the file, not the shards
    assert "ema.net.out_gain" in checkpoint.read(newest, checkpoint.UNBOUNDED).tensors
    (shards[1] / ".metadata").unlink()
    with pytest.raises(UserError, match=r"its files are not the checkpoint's \(\.metadata\)"):
        checkpoint.restore(compile_spec(validate(spec("lsd"))), newest)
    (run / "checkpoints" / "step-00000002.safetensors").unlink()  # as if killed between folder and file
    stray = run / "checkpoints" / "step-00000001.shards-0badc0de"  # an earlier write of a step still named
    shutil.copytree(shards[0], stray)
    assert checkpoint.remove_temporaries(run) == [stray, shards[1]]
    assert shards[0].is_dir() and not shards[1].exists() and not stray.exists()
    assert checkpoint.newest(run, None, checkpoint.UNBOUNDED, accept=lambda ckpt: checkpoint.restore(
        compile_spec(validate(spec("lsd"))), ckpt)).state["step"] == 1  # the named folder kept whole
    checkpoint.remove_after(run / "checkpoints", 0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest"]


def test_options_that_cannot_run_on_n_processes_are_one_line_before_any_starts(tmp_path, main):
    spec = tmp_path / "s.toml"
    spec.write_text('[data]\nkind = "checkerboard"\n[objective]\ncharacterization = "lagrangian"\n'
                    '[train]\nbatch_size = 12\ndevice = "cpu"\n')
    code, _, err = main("run", spec, "--set", "train.grad_accum=5")
    assert (code, err) == (2, f"{spec}: train.grad_accum: 5 micro-batches do not split train.batch_size = 12 evenly "
                              "(valid: a divisor of 12)\n")
    code, _, err = main("run", spec, "--nproc", "2", "--set", "train.grad_accum=4", "--set", 'train.ddp_comm="bf16"',
                        "--set", 'train.parallel="fsdp"', "--set", "train.compile=true")
    assert code == 2
    assert err.splitlines() == [
        f"{spec}: train.batch_size: 12 samples do not split evenly over 2 processes x 4 micro-batches "
        "(valid: a multiple of 8)",
        f'{spec}: train.parallel: "fsdp" needs the same network passes on every process, so diagonal and other '
        "samples in each of the 8 chunks: objective.diagonal_fraction = 0.75 of train.batch_size = 12 gives 9 and 3 "
        "(valid: at least 8 of each, or none)",
        f'{spec}: train.ddp_comm: "bf16" needs the NCCL backend (a GPU per process); this run uses gloo '
        '(valid: "fp32")',
        f'{spec}: train.compile: not with train.parallel = "fsdp" (compiled FSDP2 units are untested here; '
        'valid: false, or parallel = "ddp")']


class SquaredNorm(FeatureMetric):
    """mean |x|^2 of the samples, computed from per-sample features |x_i|^2 (a feature metric)."""

    seen: list[int] = []

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        self.seen.append(samples.shape[0])
        return samples.flatten(1).double().pow(2).sum(1, keepdim=True)

    def from_features(self, features, dataset, generator) -> float:
        return float(features.mean())


def _eval_spec() -> dict:
    return {**spec("lsd"), "eval": {"metrics": [], "num_samples": 11, "steps": [1, 2], "flow_map_error": False,
                                    "plot": False}}


def _eval_worker(rank: int, out: Path) -> None:
    from flowspec.evaluate import evaluate

    graph = compile_spec(validate(_eval_spec()))
    graph.metrics = {"sq": SquaredNorm()}
    results = evaluate(graph)
    torch.save({"results": results, "seen": SquaredNorm.seen}, out / f"rank{rank}.pt")


def test_sharded_evaluation_extracts_each_ranks_features_on_that_rank(tmp_path):
    """Each of 2 ranks extracts the features of its own share of the samples (6 and 5 of 11); rank 0
    computes the metric from the gathered features, equal to one process's value."""
    from flowspec.evaluate import evaluate

    _spawn(_eval_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["seen"] for r in ranks] == [[6, 6], [5, 5]]  # per K: only the rank's share
    assert ranks[1]["results"] == {}
    graph = compile_spec(validate(_eval_spec()))
    graph.metrics = {"sq": SquaredNorm()}
    single = evaluate(graph)
    for k in ("1", "2"):
        assert ranks[0]["results"][k]["sq"] == pytest.approx(single[k]["sq"], rel=1e-12)
