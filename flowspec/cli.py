"""The ``flowspec`` command line: run, validate, explain, sample, check, eval, plugins, schema (on the
app of :mod:`flowspec.cli_app`: --version, -h, shell completion)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from flowspec.cli_app import app
from flowspec.errors import UserError
from flowspec.naming import describe

out = Console()
err = Console(stderr=True)

SetOption = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                         help="override a spec value, read as TOML (repeatable)")


def warn(*lines: str) -> None:
    """Lines on stderr, never wrapped, in one write: the processes of a data-parallel run share
    stderr, unbuffered (torchrun starts them with python -u), and print() writes a line and its
    newline apart, so that two processes' lines would run into each other."""
    sys.stderr.write("".join(f"{line}\n" for line in lines))
    sys.stderr.flush()


def _load(spec: Path, overrides: list[str] | None):
    from flowspec.spec import load_spec

    return load_spec(spec, overrides or [])


def _compile(s, source: Path):
    """compile_spec with input errors prefixed by the spec file, and running out of memory (the
    checks' estimate of a network's size fell short) as one line, exit 1."""
    import torch

    from flowspec.compile import compile_spec

    try:
        return compile_spec(s)
    except UserError as exc:
        if exc.exit_code == 2:
            exc.lines = [line if line.startswith(f"{source}: ") else f"{source}: {line}" for line in exc.lines]
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise UserError(f"{source}: network: out of memory while building the training graph "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", exit_code=1) from None


@app.command()
def run(spec: Path | None = typer.Argument(None, help="the spec file (TOML); with --resume, optional"),
        set_: list[str] | None = SetOption,
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="parent of new run folders"),
        out_dir: Path | None = typer.Option(None, "--out", help="exact run folder to create"),
        force: bool = typer.Option(False, "--force", help="overwrite an existing run folder"),
        resume: Path | None = typer.Option(None, "--resume", help="continue this run folder from its "
                                              "newest good checkpoint (only train.steps may change)"),
        nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes on this machine: "
                                  "shortcut for torchrun --standalone --nproc_per_node N -m flowspec run ...")) -> None:
    """Train, evaluate and write a run folder (or continue one with --resume)."""
    from flowspec.runfolder import make as make_run_dir
    from flowspec.runfolder import refuse_existing
    from flowspec.runs import RunFolder
    from flowspec.train import train

    if resume is not None and (out_dir is not None or force):
        raise UserError("run: --resume continues RUN_DIR in place; --out and --force do not apply to it")
    if resume is None and spec is None:
        raise UserError("run: missing the spec file (usage: flowspec run SPEC, or flowspec run --resume RUN_DIR)")
    from flowspec import distributed

    if distributed.launched():
        from flowspec.launcher import die_with_parent

        die_with_parent()
    if nproc > 1 and not distributed.launched():
        # bad input fails here, in one line, before torchrun starts any process
        from flowspec import runfolder
        from flowspec.launcher import launch, precheck

        if resume is not None:
            s, source, name = resumed_spec(resume, spec, set_)
            RunFolder(resume).check_resumable(s, name)
            runfolder.check_free(resume)
            precheck(nproc, s, source, resume)
        else:
            assert spec is not None  # (checked above)
            precheck(nproc, _load(spec, set_), spec, None)
            if out_dir is not None:
                refuse_existing(out_dir, force)

        raise typer.Exit(launch(nproc, spec, set_, runs_dir, out_dir, force, resume))
    if resume is not None:
        run_resumed(resume, spec, set_)
        return
    from flowspec import runfolder

    assert spec is not None  # (checked above: a fresh run has a spec file)
    s = _load(spec, set_)
    runfolder.own_run[0] = out_dir
    ctx = _join(s)
    if ctx.is_main and out_dir is not None:
        refuse_existing(out_dir, force)  # before compiling: a folder that may not be used is refused at once
    graph = _compile(s, spec)
    _threads(graph, ctx.is_main)
    made = make_run_dir(s.name, runs_dir, out_dir, force) if ctx.is_main else None
    if made is not None:
        err.print(f"[bold]{s.name}[/]: {describe(graph)} -> {made}", soft_wrap=True)
    # one folder for all: rank 0's (its name has rank 0's timestamp)
    run_dir = Path(distributed.broadcast_text(str(made) if made else None, graph.device)) if ctx.enabled else made
    assert run_dir is not None
    try:
        train(graph, run_dir, err)
    except BaseException:
        if ctx.is_main and not (run_dir / "metrics.jsonl").exists():  # it never started: leave nothing half-written
            runfolder.discard(run_dir)
        raise
    finally:
        runfolder.release(run_dir)
    if ctx.is_main:
        out.print(str(run_dir), soft_wrap=True, markup=False, highlight=False)  # one line: a path to pipe


def _threads(graph, main: bool) -> None:
    """A CPU run's thread count for this machine, and rank 0's warning when the CPU is oversubscribed."""
    if graph.device.type == "cpu":
        from flowspec import threads

        threads.configure(warn if main else None)


def _join(s):
    """Under torchrun (WORLD_SIZE > 1): join the process group; the context of this process."""
    from flowspec import distributed
    if not distributed.launched():
        return distributed.current()
    return distributed.init(distributed.resolve_device(s.train.device).type)


def resumed_spec(run_dir: Path, spec: Path | None, overrides: list[str] | None):
    """(the spec to continue ``run_dir`` with: ``spec``, or the run's own spec.toml, with ``overrides``;
    the file it came from; its name in messages: that file, or ``--set``, the only way the run's own
    spec can differ from the run's)."""
    from flowspec.runs import RunFolder

    source = spec if spec is not None else RunFolder(run_dir).spec_path
    return _load(source, overrides), source, str(spec) if spec is not None else "--set"


def run_resumed(run_dir: Path, spec: Path | None, overrides: list[str] | None) -> None:
    """``run --resume``: the run's own spec (or ``spec``, which must match it but for train.steps)."""
    from flowspec import runfolder
    from flowspec.train import resume, train

    s, source, name = resumed_spec(run_dir, spec, overrides)
    runfolder.own_run[0] = run_dir
    ctx = _join(s)
    try:
        graph = resume(run_dir, s, name, warn, compile=lambda spec: _compile(spec, source))
        _threads(graph, ctx.is_main)
        if ctx.is_main:
            err.print(f"[bold]{s.name}[/]: {describe(graph)} -> {run_dir} (resumed at step {graph.step_count})",
                      soft_wrap=True)
        train(graph, run_dir, err, resumed=True)
    finally:
        runfolder.release(run_dir)
    if ctx.is_main:
        out.print(str(run_dir), soft_wrap=True, markup=False, highlight=False)  # one line: a path to pipe


@app.command()
def validate(spec: Path = typer.Argument(..., help="the spec file (TOML)"),
             set_: list[str] | None = SetOption,
             show: bool = typer.Option(False, "--show", help="print the resolved spec")) -> None:
    """Check a spec; print every mistake, one line each."""
    from flowspec.checks import check_spec
    from flowspec.spec import to_toml

    s = _load(spec, set_)
    problems = check_spec(s)
    if problems:
        raise UserError([f"{spec}: {line}" for line in problems])
    if show:
        out.print(to_toml(s), markup=False, highlight=False)
    else:
        out.print(f"{spec}: ok")


@app.command()
def explain(spec: Path = typer.Argument(..., help="the spec file (TOML)"),
            set_: list[str] | None = SetOption) -> None:
    """Describe the compiled training graph in words, the objective's whole formula last."""
    from flowspec.explain import explain as describe_graph

    s = _load(spec, set_)
    out.print(describe_graph(s, _compile(s, spec)), highlight=False, soft_wrap=True)


@app.command()
def plugins() -> None:
    """List registered components with their distribution (and the error of any that fails)."""
    from rich.table import Table

    from flowspec.registry import GROUPS, default_registry

    reg = default_registry()
    table = Table(title="flowspec components")
    for col in ("group", "name", "distribution", "version", "status"):
        table.add_column(col)
    for group in GROUPS:
        for name, c in reg.components(group).items():
            table.add_row(group, name, c.distribution, c.version,
                          "ok" if c.error is None else f"[red]{c.error}[/]")
    out.print(table)


@app.command()
def schema(markdown: bool = typer.Option(False, "--markdown",
                                         help="the spec reference (docs/spec.md) instead")) -> None:
    """Print the JSON schema of the spec (for editors)."""
    from flowspec.spec import spec_model
    from flowspec.spec.reference import reference

    print(reference() if markdown else json.dumps(spec_model().model_json_schema(), indent=1), end="")


def _interrupted() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third Ctrl-C cannot cut the exit short
    warn("flowspec: interrupted")
    sys.exit(130)


from flowspec.cli_check import check  # noqa: E402  (its own module: the command's report)
from flowspec.cli_eval import eval_run  # noqa: E402  (its own module: metrics on demand)
from flowspec.cli_sample import sample  # noqa: E402  (its own module: samples shaped like the data)

app.command()(check)
app.command("eval")(eval_run)
app.command()(sample)


def main() -> None:
    """Entry point: user errors are one line each, with no traceback unless FLOWSPEC_DEBUG=1. A
    rank of a data-parallel run (WORLD_SIZE > 1) ends through :func:`_end_rank`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _main()
    try:
        _main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _end_rank(code)


def _end_rank(code: int) -> None:
    """A rank's end: its files are written, synced and closed by now (the trackers too, with the
    run's status); leave the process group, flush, and exit without the interpreter's teardown.
    There the C++ threads of the backends (gloo's, the store's) can be destroyed in any order after
    their group, which now and then aborted a rank whose run had succeeded ("terminate called
    without an active exception", SIGABRT, or a SIGSEGV)."""
    leave = getattr(sys.modules.get("flowspec.distributed"), "leave", None)
    try:
        if leave is not None:
            leave()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _main() -> None:
    debug = os.environ.get("FLOWSPEC_DEBUG", "") not in ("", "0")
    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_interrupted_while_loading":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except UserError as exc:
        if debug:
            raise
        if exc.exit_code > 128:  # stopped by a signal: another Ctrl-C cannot cut the exit short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if os.environ.get("RANK", "0") != "0":  # every rank stopped at the same step: rank 0 says so
                sys.exit(exc.exit_code)
        warn(*exc.lines)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk or a vanished folder outside the places that name their file
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        warn(f"flowspec: {where}{exc.strerror or exc}")
        sys.exit(1)
    except SystemExit as exc:  # typer turns a KeyboardInterrupt into a silent exit 130
        if exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            _interrupted()
        raise
    except KeyboardInterrupt:  # Ctrl-C before training, or a second one during a step
        _interrupted()
    except Exception as exc:
        if debug:
            raise
        warn(f"flowspec: internal error: {type(exc).__name__}: {exc} (set FLOWSPEC_DEBUG=1 for the traceback)")
        sys.exit(1)
    finally:  # a command run in this process again (tests) starts afresh
        runfolder = sys.modules.get("flowspec.runfolder")
        if runfolder is not None:
            runfolder.own_run[0] = None


if __name__ == "__main__":
    main()
