"""Checkpoints: one safetensors file each, committed by one rename, every byte verified (never pickle).

``checkpoints/step-N.safetensors`` holds the model, EMA and optimizer tensors and the generator
states; its header's metadata holds the rest of the training state as JSON (``flowspec.state``:
step, optimizer settings, schedule, EMA count, counters, process count and whether another one may
resume it, the run's identity and the teacher it was trained against) and ``flowspec.digest``: the
SHA-256 of that state, of the tensor index (names, dtypes, shapes, offsets) and of every byte of
tensor data. The file is written to a temporary name, fsynced and renamed: at any kill moment a
checkpoint is either absent or whole.
``latest`` names the newest one, for people and scripts; reading never trusts it.
With FSDP the sharded parameters and moments are not gathered into the file: each rank writes its
shards with torch.distributed.checkpoint into ``step-N.shards-<token>/`` first, and the file records
the SHA-256 of each of that folder's files (flowspec.shards), checked when a resume loads them; the
EMA stays whole in the file, so sampling and teachers read the file alone.

Reading goes newest first; a checkpoint that is damaged (digest mismatch, truncated, not
safetensors), inconsistent (its step is not its name's) or foreign (another run's) is skipped, with
one warning line, for the previous good one. Only regular files are read, after a size check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from flowspec import parallel, shards, trainstate
from flowspec.atomic import atomic_text, atomic_write, read_regular  # noqa: F401 (used by train)
from flowspec.errors import UserError
from flowspec.trainstate import check_module, load_module, size_limit  # noqa: F401 (public here)

FORMAT = "flowspec-checkpoint-2"
STEM = re.compile(r"^step-(\d{8,})$")
TEMPORARY = re.compile(r"^\.(step-\d+\.(json|safetensors)|latest|spec\.toml|metrics\.jsonl|eval\.json"
                       r"|environment\.json|[^/]+\.(npy|png))\.[A-Za-z0-9_]{8}$")
#: safetensors refuses larger headers itself
HEADER_LIMIT = 100 << 20
#: the size limit of a checkpoint whose network's size is unknown before reading
UNBOUNDED = 1 << 40


class Refused(UserError):
    """A good checkpoint that this process must not continue from (another process count, another
    teacher): the run is refused, not continued from an older checkpoint."""


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    digest: str


def spec_id(spec) -> str:
    """The identity of the run a spec describes: SHA-256 of the resolved spec but train.steps and
    [log] (how a run is tracked is not what it trains; runs written before [log] existed keep theirs)."""
    data = spec.model_dump(mode="json")
    data.get("train", {}).pop("steps", None)
    data.pop("log", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _digest(header: dict, data: memoryview | bytes) -> str:
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "flowspec.digest"}
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(FORMAT.encode() + b"\n")
    h.update(json.dumps({"metadata": meta, "tensors": index}, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def encode(tensors: dict[str, torch.Tensor], state: dict) -> tuple[bytes, memoryview, str]:
    """(length + header, tensor data, digest): the bytes of one checkpoint file."""
    raw = save_bytes(tensors, metadata={"flowspec.format": FORMAT,
                                        "flowspec.state": json.dumps(state, allow_nan=False)})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    digest = _digest(header, data)
    header["__metadata__"]["flowspec.digest"] = digest
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, data, digest


def save(graph, run_dir: Path, keep: int = 0) -> Path | None:
    """Write the graph's full training state as ``checkpoints/step-N.safetensors`` (one rename), then
    the ``latest`` hint, then remove all but the newest ``keep`` (0 keeps all). Only rank 0 writes;
    the other ranks of a data-parallel run return None."""
    ckpt_dir = run_dir / "checkpoints"
    stem = f"step-{graph.step_count:08d}"
    sharded = parallel.shards(graph.model, graph.optimizer)
    manifest = shards.write(sharded, ckpt_dir, stem, graph.dist, graph.device) if sharded else None
    collected = trainstate.collect(graph)
    if collected is None:
        return None
    tensors, state = collected
    state.update(format=FORMAT, run=spec_id(graph.spec), teacher=graph.teacher_pin)
    if manifest is not None:
        state["shards"] = manifest
    path = ckpt_dir / f"{stem}.safetensors"

    def write(p: Path) -> None:
        head, data, _ = encode(tensors, state)
        with open(p, "wb") as f:
            f.write(head)
            f.write(data)

    atomic_write(path, write)
    shards.remove(ckpt_dir, stem, keep=manifest["folder"] if manifest else None)  # an earlier write's
    atomic_text(ckpt_dir / "latest", stem + "\n")
    if keep:
        prune(ckpt_dir, keep)
    return path


def _damaged(path: Path, why: str = "checksum mismatch: the checkpoint is truncated or corrupted") -> UserError:
    return UserError(f"{path}: {why}", exit_code=1)


def read(path: Path, limit: int, run: str | None = None) -> Checkpoint:
    """A checkpoint whose every byte is verified; a one-line UserError (exit 1) otherwise.

    Args:
        limit: the most bytes the file may have (checked before reading).
        run: the expected :func:`spec_id` (None: any run's)."""
    try:
        raw = read_regular(path, limit)
    except OSError as exc:
        raise _damaged(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) < 8:
        raise _damaged(path)
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or n > HEADER_LIMIT:
        raise _damaged(path, f"not a safetensors file (bad header length {n})")
    if 8 + n > len(raw):
        raise _damaged(path)
    try:
        header = json.loads(raw[8:8 + n])
        meta = header["__metadata__"]
        digest, text = meta["flowspec.digest"], meta["flowspec.state"]
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ValueError) and not raw[8:9] == b"{":
            raise _damaged(path, "not a safetensors file (no JSON header)") from None
        raise _damaged(path, "not a flowspec checkpoint, or its header is damaged") from None
    data = memoryview(raw)[8 + n:]
    ends = [e.get("data_offsets", [0, 0])[1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]
    if _digest(header, data) != digest or max(ends, default=0) != len(data):
        raise _damaged(path)
    try:
        tensors = load_bytes(raw)
        state = json.loads(text)
    except (SafetensorError, ValueError, OSError) as exc:
        raise _damaged(path, f"not a safetensors file ({exc})") from None
    match = STEM.match(path.stem)
    if not isinstance(state, dict) or match is None or state.get("step") != int(match.group(1)):
        raise _damaged(path, f"inconsistent: its step {state.get('step') if isinstance(state, dict) else '?'} "
                             "is not the one in its name")
    if run is not None and state.get("run") != run:
        raise _damaged(path, "belongs to another run (its spec differs from the run's)")
    return Checkpoint(path, tensors, state, digest)


def newest(run_dir: Path, warn: Callable[[str], None] | None, limit: int, run: str | None = None,
           accept: Callable[[Checkpoint], None] | None = None) -> Checkpoint:
    """The newest good checkpoint of a run folder (read, verified, and taken by ``accept`` without a
    UserError); damaged ones are skipped with a warning. A :class:`Refused` from ``accept`` ends the
    search; none good is a one-line UserError (exit 1)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    for stem in stems(ckpt_dir):
        path = ckpt_dir / f"{stem}.safetensors"
        try:
            ckpt = read(path, limit, run)
            if accept is not None:
                accept(ckpt)
        except Refused:
            raise
        except UserError as exc:
            _warn(warn, f"{exc.lines[0]}; skipped for the previous checkpoint")
            continue
        return ckpt
    raise UserError(f"{run_dir}: no complete checkpoint found in {ckpt_dir}", exit_code=1)


def latest(run_dir: Path, warn: Callable[[str], None] | None = None, limit: int = UNBOUNDED) -> Path:
    """Path of the newest good checkpoint (see :func:`newest`)."""
    return newest(run_dir, warn, limit).path


def _warn(warn: Callable[[str], None] | None, message: str) -> None:
    if warn is not None:
        warn(f"warning: {message}")


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes cut short (by SIGKILL, say) in a run folder."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        for path in folder.glob(".*") if folder.is_dir() else ():
            if TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    ckpt_dir = run_dir / "checkpoints"
    removed += shards.remove_orphans(ckpt_dir, {stem: _shards_named(ckpt_dir / f"{stem}.safetensors")
                                                for stem in stems(ckpt_dir)})
    return removed


def _shards_named(path: Path) -> str | None:
    """The shards folder a checkpoint file's header names (unverified: only to tell what a folder
    left by an interrupted write is; None when there is none, or no readable header)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 2 <= n <= HEADER_LIMIT else {}
        named = json.loads(header["__metadata__"]["flowspec.state"]).get("shards", {}).get("folder")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return named if isinstance(named, str) else None


def stems(ckpt_dir: Path) -> list[str]:
    """Checkpoint names ``step-N`` that have a tensor file, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = {p.stem for p in ckpt_dir.glob("step-*.safetensors") if STEM.match(p.stem)}
    return sorted(found, key=lambda s: int(s[5:]), reverse=True)


def _remove(ckpt_dir: Path, stem: str) -> None:
    for suffix in (".json", ".safetensors"):  # .json: the metadata of the earlier two-file format
        (ckpt_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    shards.remove(ckpt_dir, stem)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints."""
    for stem in stems(ckpt_dir)[keep:]:
        _remove(ckpt_dir, stem)


def remove_after(ckpt_dir: Path, step: int) -> None:
    """Remove checkpoints newer than ``step`` (on resume from ``step``: the damaged ones skipped;
    the resumed run writes them again)."""
    for stem in stems(ckpt_dir):
        if int(stem[5:]) > step:
            _remove(ckpt_dir, stem)


def pointer(ckpt_dir: Path) -> str | None:
    """The checkpoint ``latest`` names (a hint for messages; never trusted when reading)."""
    try:
        stem = read_regular(ckpt_dir / "latest", 256).decode("utf-8").strip()
    except (OSError, UserError, UnicodeDecodeError):
        return None
    return stem if STEM.match(stem) else None


def same_world(ckpt: Checkpoint, world_size: int) -> None:
    """:class:`Refused` when resuming ``ckpt`` with ``world_size`` processes would not continue its
    run: another process count than its own, unless its streams were the shared ones (every rank
    drawing the whole batch, flowspec.distributed) and no step drew random numbers during its loss
    (a residual's or dropout's, which depend on the batch's split)."""
    state = ckpt.state
    world = state.get("world_size", 1)
    if world == world_size or (state.get("streams") == trainstate.STREAMS and state.get("split_free") is True):
        return
    why = ("its steps drew random numbers that depend on the split over processes (a residual's or dropout's)"
           if state.get("streams") == trainstate.STREAMS else "it was written before streams shared by all processes")
    raise Refused(f"{ckpt.path.parent.parent}: trained with {world} process{'es' if world != 1 else ''}, "
                  f"resumed with {world_size}: {why}, so the result would differ; resume with "
                  + (f"--nproc {world}" if world != 1 else "one process (no --nproc)"))


def restore(graph, ckpt: Checkpoint | Path) -> None:
    """Load a verified checkpoint (or the checkpoint file at a path, read and verified here) into a
    freshly compiled graph (see :func:`trainstate.apply`); :class:`Refused` for another process
    count or another teacher."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = read(Path(ckpt), size_limit(graph.model))
    state, where = ckpt.state, ckpt.path
    same_world(ckpt, graph.dist.world_size)
    pinned, current = state.get("teacher"), graph.teacher_pin
    if pinned != current:
        was, now = (f"{p['run']} ({p['checkpoint']}, sha256 {p['sha256'][:12]})" if isinstance(p, dict)
                    else "none" for p in (pinned, current))
        raise Refused(f"teacher.path: the teacher changed since {where.name}: it was {was}, now {now} "
                      "(another checkpoint); restore that teacher checkpoint, or start a new run")
    tensors = ckpt.tensors
    if "shards" in state:  # verified only here, where they are used; every rank loads its part (DCP reshards)
        folder = shards.verify(where.parent, where.stem, state["shards"], graph.dist, graph.device)
        tensors = {**tensors, **shards.load(folder, parallel.shard_layout(graph.model), where)}
    trainstate.apply(graph, tensors, state, where)


def load_tensors(path: Path, limit: int = UNBOUNDED) -> dict[str, torch.Tensor]:
    """The tensors of one verified checkpoint file (see :func:`read`)."""
    return read(path, limit).tensors
