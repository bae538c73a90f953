"""``flowspec run --nproc N``: torchrun started in this process, and the ranks' side of it (they end
with the launcher)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

LAUNCHER_PID = "FLOWSPEC_LAUNCHER_PID"


def warn(*lines: str) -> None:
    sys.stderr.write("".join(f"{line}\n" for line in lines))
    sys.stderr.flush()


def launch(nproc: int, spec, overrides, runs_dir: Path, out_dir, force: bool, resume) -> int:
    """``run --nproc N``: run torchrun (standalone rendezvous) in this process to start N processes
    of ``flowspec run`` on this machine; returns the exit status of the first process to fail (or
    0). The processes print their own errors; a failure ends with one line here instead of
    torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "flowspec", "run"]
    if spec is not None:
        args.append(str(spec))
    for item in overrides or []:
        args += ["--set", item]
    args += ["--runs-dir", str(runs_dir)]
    if out_dir is not None:
        args += ["--out", str(out_dir)]
    if force:
        args.append("--force")
    if resume is not None:
        args += ["--resume", str(resume)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too, said out loud
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks end when this process does
    try:
        torchrun(parse_args(args))
    except ChildFailedError as exc:  # torchrun has stopped the other processes
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"exit status {code}" if code > 0 else signal.Signals(-code).name
        warn(f"run --nproc {nproc}: rank {rank} failed first ({how}); its error is above")
        return code if code > 0 else 128 - code
    except SignalException as exc:  # torchrun has passed the signal on to the processes and stopped them
        warn(f"run --nproc {nproc}: stopped by {exc.sigval.name}")
        return 128 + int(exc.sigval)
    return 0


def precheck(nproc: int, s, source, run_dir: Path | None) -> None:
    """What the ranks would find wrong, found here once, with the file prefix, before any starts:
    every spec check, the batch's split and the options' fit to N processes, and (resuming) whether the run's
    checkpoints may continue with N processes."""
    from flowspec import checkpoint, distributed
    from flowspec.checks import check_spec
    from flowspec.errors import UserError
    from flowspec.runs import RunFolder

    lines = check_spec(s)
    try:
        kind = distributed.resolve_device(s.train.device).type
    except UserError:  # check_spec said so
        kind = "cpu"
    lines += distributed.split_problems(s.train, nproc, distributed.backend(kind, nproc), s.objective.diagonal_fraction)
    if lines:
        raise UserError([f"{source}: {line}" for line in lines])
    run = RunFolder(run_dir) if run_dir is not None else None
    if run is not None and run.steps():
        try:
            run.checkpoint(run.size_limit(), accept=lambda ckpt: checkpoint.same_world(ckpt, nproc))
        except checkpoint.Refused:
            raise
        except UserError:  # no good checkpoint: the ranks say so, with their warnings
            pass


def die_with_parent() -> None:
    """In a rank: SIGTERM when the launching process ends (kill -9 included), so that no rank trains
    on alone (Linux: prctl PR_SET_PDEATHSIG; the launcher's pid is checked for a parent already gone).
    SIGTERM stops a training rank at the next step with a checkpoint."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get(LAUNCHER_PID, "")
    if os.getppid() == 1 or (expected.isdigit() and not _alive(int(expected))):
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
