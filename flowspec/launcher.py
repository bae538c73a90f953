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
    from torch.distributed.run import parse_args, run as torchrun

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
