"""flowspec: train flow maps (consistency models) from declarative TOML specs.

Public API::

    spec = load_spec("specs/checkerboard-lsd.toml", overrides=["train.steps=100"])
    graph = compile_spec(spec)
    results = train(graph, run_dir)
    graph = resume(run_dir, spec, "spec.toml", warn=print)   # newest good checkpoint of a run
    results = train(graph, run_dir, resumed=True)
    x = sample(graph.sampler(), x0, steps=2)

    run = load_run(run_dir)                  # a trained run, read-only (docs/python-api.md)
    x = run.sample(10_000, steps=2)          # shaped like the data; x0 from eval.seed by default
    table = run.evaluate(steps=[1, 2, 4], metrics=["kl"])   # metric by K, as eval.json has them
    run.spec, run.flow_map, run.checkpoints  # the resolved spec, the EMA FlowMap, (step, path) pairs

    folder = RunFolder(run_dir)              # the lower-level reader: spec, checkpoints, EMA map
    loaded = folder.flow_map("cpu")          # only the network is built; every byte verified

The names load on first use (PEP 562), so that ``import flowspec`` and the command line's ``--help``
do not import torch.
"""

import os as _os
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

if _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "flowspec":
    import signal as _signal

    def _interrupted_while_loading(signum, frame):
        """Ctrl-C while the command line loads torch: one line, exit 130 (flowspec.cli.main takes
        over the handling once loaded)."""
        _sys.stderr.write("flowspec: interrupted\n")
        _os._exit(130)

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _interrupted_while_loading)

# MLflow 3 opens a file store (flowspec's default: RUN/mlruns) only when this is set; a user's own
# setting is kept (flowspec.tracking, README "Tracking")
_os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

if TYPE_CHECKING:
    from flowspec.compile import compile_spec
    from flowspec.engine import TrainingGraph
    from flowspec.flowmap import FlowMap
    from flowspec.runs import RunFolder
    from flowspec.spec import load_spec
    from flowspec.train import resume, train
    from flowspec.trained import Run, load_run

#: each public name and the module it is defined in, imported when the name is first used
_PUBLIC = {"compile_spec": "flowspec.compile", "TrainingGraph": "flowspec.engine", "FlowMap": "flowspec.flowmap",
           "RunFolder": "flowspec.runs", "load_spec": "flowspec.spec", "resume": "flowspec.train",
           "train": "flowspec.train", "Run": "flowspec.trained", "load_run": "flowspec.trained"}


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown" when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowspec")
    except PackageNotFoundError:
        return "unknown"


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name == "__version__":
        globals()[name] = _installed_version()
        return globals()[name]
    raise AttributeError(f"module 'flowspec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, "__version__"})


class _Package(_types.ModuleType):
    """The package keeps ``flowspec.train`` the function: importing the submodule of that name
    (``from flowspec.train import ...``) would otherwise rebind the attribute to the module."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, _types.ModuleType):
            return  # the submodule stays in sys.modules; the package's name is the function
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def sample(flow_map: "FlowMap", x0, steps: int):
    """K-step samples X_{t_{K-1},1} o ... o X_{0,t_1}(x0) on the uniform grid (see FlowMap.sample)."""
    return flow_map.sample(x0, steps)


__all__ = ["FlowMap", "Run", "RunFolder", "TrainingGraph", "compile_spec", "load_run", "load_spec", "resume", "sample",
           "train"]
