"""The sharded part of a checkpoint: ``torch.distributed.checkpoint`` (DCP), verified like the rest.

With ``train.parallel = "fsdp"`` the flow map's parameters and their optimizer moments are sharded
(DTensors, flowspec.parallel). A checkpoint then writes them with DCP, each rank its own shards and
no rank a whole copy, into ``checkpoints/step-N.shards-<token>/`` (DCP's files: ``.metadata`` and
one ``__<rank>_<k>.distcp`` per rank), named by the tensor names of the checkpoint file
(``model.<name>``, ``optim.<i>.<slot>``). Everything else (the EMA, always whole, so that the map
samples and teaches from the one safetensors file; the generators; the 0-dimensional parameters,
which FSDP2 holds as (1,)) stays in ``step-N.safetensors``, whose state names the folder and the
SHA-256 and size of each of its files.

Order: the folder is written and synced first, then the safetensors file is committed by its rename.
A kill in between leaves a folder that no checkpoint names (:func:`remove_orphans` deletes it). A resume
verifies the folder before it loads it (flowspec.checkpoint.restore): files that do not match the
digests its checkpoint holds make that checkpoint damaged (skipped for the previous one), and DCP's
``.metadata``, a pickle, is read only after its digest matched. Reading the EMA alone (sampling, a
teacher) does not touch the folder.

DCP reshards on load: a checkpoint written by W processes loads into W' sharded processes, or into
one process (or DDP's replicas) as whole tensors, which is what resuming with another process count
needs (flowspec.checkpoint.same_world decides whether the math allows it).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from flowspec import distributed
from flowspec.atomic import fsync_dir, regular_chunks
from flowspec.errors import UserError

FOLDER = re.compile(r"^(step-\d{8,})\.shards-[0-9a-f]{8}$")


def write(shards: dict[str, Any], ckpt_dir: Path, stem: str, ctx, device: torch.device) -> dict | None:
    """DCP-save ``shards`` (every rank calls this, with its own DTensors) into a new folder of
    ``ckpt_dir``; rank 0 returns the manifest the checkpoint file records (None elsewhere)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    token = secrets.token_hex(4)
    if ctx.enabled:
        token = distributed.broadcast_text(token, device)
    folder = ckpt_dir / f"{stem}.shards-{token}"
    made: OSError | None = None
    if ctx.is_main:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            made = exc
    if distributed.any_flag(made is not None, device) if ctx.enabled else made is not None:  # every rank stops
        why = (made.strerror or str(made)) if made is not None else "rank 0 could not create it"
        raise UserError(f"{folder}: cannot write: {why}", exit_code=1)
    try:
        dcp.save(shards, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))
        distributed.barrier()  # every rank's files are written and synced
    except (OSError, CheckpointException) as exc:  # DCP gathers every rank's failure (a full disk, say)
        raise UserError(f"{folder}: cannot write: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        exit_code=1) from None
    if not ctx.is_main:
        return None
    fsync_dir(folder)
    fsync_dir(ckpt_dir)
    files = {}
    for path in sorted(folder.iterdir()):
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"folder": folder.name, "format": "torch.distributed.checkpoint", "files": files}


def verify(ckpt_dir: Path, stem: str, manifest: Any, ctx, device: torch.device) -> Path:
    """The shards folder of checkpoint ``stem``, every file's size and SHA-256 matched against the
    manifest its checkpoint holds; a one-line UserError (exit 1) naming what does not match. With
    several processes each reads its share of the files (file i: rank i mod W) and all agree."""
    try:
        name, files = manifest["folder"], manifest["files"]
        match = FOLDER.match(name)
        if match is None or match.group(1) != stem or not isinstance(files, dict) or not files:
            raise ValueError
        expected = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{ckpt_dir / stem}.safetensors: its shards are named in a damaged record",
                        exit_code=1) from None
    folder = ckpt_dir / name
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{folder}: missing: the checkpoint's sharded state is not there", exit_code=1)
    present = {p.name for p in folder.iterdir()}
    if present != set(expected):
        odd = sorted(present ^ set(expected))
        raise UserError(f"{folder}: its files are not the checkpoint's ({', '.join(odd[:3])}"
                        + (" ..." if len(odd) > 3 else "") + ")", exit_code=1)
    found = None
    for i, (file, (size, digest)) in enumerate(sorted(expected.items())):
        if i % ctx.world_size == ctx.rank and _sha256(folder / file, size) != digest:
            found = folder / file
            break
    finder = ctx.rank if found is not None else -1
    if ctx.enabled:
        finder = int(distributed.max_flag(torch.tensor(float(finder)), device).item())
    if finder >= 0:
        where = found if found is not None else f"{folder}: a file (read by rank {finder})"
        raise UserError(f"{where}: checksum mismatch: the checkpoint's shard is truncated or corrupted", exit_code=1)
    return folder


def load(folder: Path, like: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The tensors of a verified shards folder, each laid out like its entry of ``like`` (or, for
    ``optim.<i>.<slot>``, like ``optim.<i>``; a DTensor: this rank's shard, resharded from however
    many ranks wrote it; a tensor: whole). Every rank of a process group calls this; a one-line
    UserError (exit 1) when the names or shapes do not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    templates, odd = {}, []
    for k, m in sorted(stored.items()):
        ref = like.get(k, like.get(k.rsplit(".", 1)[0]))  # optim.<i>.<slot>: like optim.<i>
        if ref is None or not isinstance(m, TensorStorageMetadata) or tuple(m.size) != tuple(ref.shape):
            odd.append(k)
        else:
            templates[k] = torch.zeros_like(ref, dtype=m.properties.dtype)
    if odd:
        names = ", ".join(odd[:5]) + (" ..." if len(odd) > 5 else "")
        raise UserError(f"{source}: checkpoint does not match the network (shards {names})", exit_code=1)
    with warnings.catch_warnings():  # one process loading alone is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(templates, storage_reader=reader)
    return templates


def remove(ckpt_dir: Path, stem: str, keep: str | None = None) -> None:
    """Delete the shards folders of checkpoint ``stem`` (but ``keep``)."""
    for path in ckpt_dir.glob(f"{stem}.shards-*"):
        if FOLDER.match(path.name) and path.name != keep and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def remove_orphans(ckpt_dir: Path, named: dict[str, str | None]) -> list[Path]:
    """Delete the shards folders that no checkpoint names (``named``: each checkpoint stem's folder,
    None for one without shards), the remains of a write cut short between its folder and its file;
    the folders deleted."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for path in sorted(ckpt_dir.glob("step-*.shards-*")):
        match = FOLDER.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and named.get(match.group(1)) != path.name:
            shutil.rmtree(path, ignore_errors=True)
            out.append(path)
    return out


def _sha256(path: Path, size: int | None = None) -> str:
    """SHA-256 of a regular file of at most ``size`` bytes, read in pieces ('' when it is none)."""
    h = hashlib.sha256()
    try:
        for chunk in regular_chunks(path, path.stat().st_size if size is None else size):
            h.update(chunk)
    except (OSError, UserError):
        return ""
    return h.hexdigest()
