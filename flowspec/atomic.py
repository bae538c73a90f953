"""Files written whole or not at all (temporary file beside the target, fsync, rename, fsync of the
folder), strict JSON, and bounded reads of regular files only."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowspec.errors import UserError


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


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
        tmp = None
        fsync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"{path}: cannot write: {exc.strerror or exc}", exit_code=1) from None
        raise


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_npy(path: Path, array) -> None:
    """``np.save`` through a file object (np.save would append .npy to the temporary name)."""
    import numpy as np

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kw) -> str:
    """Strict JSON (non-finite numbers as null; never a bare NaN)."""
    return json.dumps(finite(value), allow_nan=False, **kw)


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link, device or pipe) of at most
    ``limit`` bytes; an OSError or a UserError (exit 1) naming the file otherwise."""
    return b"".join(regular_chunks(path, limit))


def regular_chunks(path: Path, limit: int, size: int = 1 << 24) -> Iterator[bytes]:
    """:func:`read_regular` in pieces of at most ``size`` bytes (a file too large to hold whole: a
    checkpoint's shards, hashed as they are read); the same checks, before the first piece."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_symlink():
            raise UserError(f"{path}: is a symbolic link; only regular files are read", exit_code=1) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: not a regular file; only regular files are read", exit_code=1)
        if info.st_size > limit:
            raise UserError(f"{path}: {info.st_size:,} bytes, more than it can hold ({limit:,})", exit_code=1)
        left = info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, size))
            if not chunk:
                break
            yield chunk
            left -= len(chunk)
    finally:
        os.close(fd)
