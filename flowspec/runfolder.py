"""Run folders: what makes a folder a flowspec run, ``--force`` emptying nothing else, an advisory
lock while a process trains in one, and automatic names that cannot collide.

A run folder holds only what flowspec writes: ``spec.toml`` with ``metrics.jsonl``, ``checkpoints/``
or ``environment.json``, and nothing but flowspec's files besides. ``--force`` empties such a folder
and refuses anything else (a folder with other files, the working directory or a folder above it).

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``, held for the life of the process that trains
there: the kernel releases it when the process ends, however it ends (kill -9 included), so a
stale lock cannot exist; the file itself stays (removing it would let two processes lock two files).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import shutil
from pathlib import Path

from flowspec.errors import UserError

LOCK = ".lock"
#: top-level files flowspec writes in a run folder (the plots of flowspec.plots; the csv tracker's tables)
RUN_FILES = {"spec.toml", "environment.json", "metrics.jsonl", "eval.json", LOCK, "loss.png", "nfe.png",
             "metrics.csv", "params.csv"}
#: files of flowspec's own sub-folders, by folder (evals/: ``flowspec eval``'s records)
RUN_SUBFOLDERS = {"checkpoints": re.compile(r"^(step-\d{8,}\.(safetensors|json)|latest)$"),
                  "samples": re.compile(r"^[^/]+\.(npy|png)$"),
                  "evals": re.compile(r"^eval-\d{8}-\d{6}(-\d+)?\.json$")}
#: folders that a tracker of ``[log] backends`` fills with its library's own files (flowspec.tracking)
TRACKER_FOLDERS = {"tensorboard", "mlruns", "wandb"}
#: a temporary file of an atomic write cut short (``.NAME.RANDOM``)
TEMPORARY = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]{6,}$")
MARKERS = ("metrics.jsonl", "checkpoints", "environment.json")

_held: dict[Path, int] = {}  # run folder (resolved) -> the lock file's descriptor
#: the run folder this process trains in, set by the command line (a teacher run may not be it)
own_run: list[Path | None] = [None]


def foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` (relative names) that flowspec does not write in a run folder."""
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif name in TRACKER_FOLDERS and entry.is_dir():
            continue
        elif name in RUN_SUBFOLDERS and entry.is_dir():
            pattern = RUN_SUBFOLDERS[name]
            foreign += [f"{name}/{e.name}" for e in sorted(entry.iterdir())
                        if e.is_symlink() or not e.is_file()
                        or not (pattern.match(e.name) or TEMPORARY.match(e.name))]
        elif not (entry.is_file() and (name in RUN_FILES or TEMPORARY.match(name))):
            foreign.append(name)
    return foreign


def is_run_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding a flowspec run and nothing else."""
    return (path.is_dir() and not path.is_symlink() and (path / "spec.toml").is_file()
            and any((path / m).exists() for m in MARKERS) and not foreign_entries(path))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_forceable(path: Path) -> None:
    """An error (exit 2, nothing touched) unless ``--force`` may empty ``path``."""
    if path.is_symlink():
        raise UserError(f"{path}: --force: is a symbolic link; --force empties only a run folder itself")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        what = "the working directory" if target == here else "a folder above the working directory"
        raise UserError(f"{path}: --force: refusing to empty {what}; name a run folder with --out")
    if not path.is_dir():
        raise UserError(f"{path}: --force: not a folder")
    foreign = foreign_entries(path)
    if foreign:
        raise UserError(f"{path}: --force: not a flowspec run folder (it holds {_shown(foreign)}); "
                        "--force empties only run folders: choose another --out")
    if not (path / "spec.toml").is_file():
        raise UserError(f"{path}: --force: not a flowspec run folder (no spec.toml); choose another --out")


def empty(path: Path) -> None:
    """Remove a run folder's contents (checked with :func:`check_forceable`), the lock file excepted."""
    # spec.toml last: a process killed half-way leaves a folder that --force still recognises
    for entry in sorted(path.iterdir(), key=lambda e: e.name == "spec.toml"):
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f" (pid {text})" if text.isdigit() else ""


def acquire(run_dir: Path) -> None:
    """Hold the run folder's lock for the life of this process; an error (exit 2) when another
    process holds it."""
    import fcntl

    key = run_dir.resolve()
    if key in _held:
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(run_dir / LOCK, flags, 0o644)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder: {exc.strerror or exc}", exit_code=1) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = _owner(fd)
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise UserError(f"{run_dir}: a flowspec process{owner} is training in this run folder; "
                            "wait for it to end (or stop it) first") from None
        raise UserError(f"{run_dir}: cannot lock the run folder: {exc.strerror or exc}", exit_code=1) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def check_free(run_dir: Path) -> None:
    """An error when another process trains in ``run_dir`` (the lock taken and given back at once)."""
    if run_dir.is_dir() and (run_dir / LOCK).exists() and run_dir.resolve() not in _held:
        acquire(run_dir)
        release(run_dir)


def _new_folder(runs_dir: Path, name: str) -> Path:
    """``runs_dir/NAME-TIMESTAMP`` (``-2``, ``-3``, ... when taken), created with an exclusive mkdir:
    two processes never get the same folder."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{runs_dir}: cannot write the run folder: {exc.strerror or exc}", exit_code=1) from None
    stem = f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 10_000):
        path = runs_dir / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{path}: cannot write the run folder: {exc.strerror or exc}", exit_code=1) from None
    raise UserError(f"{runs_dir}: cannot find a free run folder name for {stem}", exit_code=1)


#: run folders this process created (removed again when the run fails before it starts)
_created: set[Path] = set()


def refuse_existing(path: Path, force: bool) -> bool:
    """True when ``path`` is a non-empty folder that ``force`` may empty (checked: a run folder, not
    the working directory, not live); an error (exit 2, nothing touched) otherwise."""
    if path.is_symlink() and force:
        check_forceable(path)
    if not path.exists() or (path.is_dir() and not any(e.name != LOCK for e in path.iterdir())):
        check_free(path)
        return False
    if not force:
        check_free(path)
        raise UserError(f"{path}: run folder exists (use --force to overwrite, or --out for another)")
    check_forceable(path)
    check_free(path)
    return True


def make(name: str, runs_dir: Path = Path("runs"), out: Path | None = None, force: bool = False) -> Path:
    """Create (or, with ``force``, empty) the run folder and lock it; see :func:`refuse_existing`."""
    if out is None:
        path = _new_folder(runs_dir, name)
        _created.add(path)
    else:
        path = out
        if refuse_existing(path, force):
            acquire(path)
            empty(path)
        elif not path.exists():
            try:
                path.mkdir(parents=True)
                _created.add(path)
            except FileExistsError:  # another process made it just now: its lock decides
                pass
            except OSError as exc:
                raise UserError(f"{path}: cannot write the run folder: {exc.strerror or exc}",
                                exit_code=1) from None
    try:
        acquire(path)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        discard(path)
        raise UserError(f"{path}: cannot write the run folder: {exc.strerror or exc}", exit_code=1) from None
    except UserError:
        if path in _created:
            discard(path)
        raise
    return path


def discard(path: Path) -> None:
    """Undo :func:`make` for a run that never started: remove the folder if this process created
    it, else only the files flowspec wrote in it."""
    release(path)
    if path in _created:
        _created.discard(path)
        shutil.rmtree(path, ignore_errors=True)
        return
    if path.is_dir() and not foreign_entries(path):
        for entry in path.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
