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
"""

import os as _os
import sys as _sys

if _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "flowspec":
    import signal as _signal

    def _interrupted_while_loading(signum, frame):
        """Ctrl-C while the command line loads torch: one line, exit 130 (flowspec.cli.main takes
        over the handling once loaded)."""
        _sys.stderr.write("flowspec: interrupted\n")
        _os._exit(130)

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _interrupted_while_loading)

from flowspec.compile import compile_spec
from flowspec.engine import TrainingGraph
from flowspec.flowmap import FlowMap
from flowspec.runs import RunFolder
from flowspec.spec import load_spec
from flowspec.train import resume, train
from flowspec.trained import Run, load_run

__version__ = "0.1.0"


def sample(flow_map: FlowMap, x0, steps: int):
    """K-step samples X_{t_{K-1},1} o ... o X_{0,t_1}(x0) on the uniform grid (see FlowMap.sample)."""
    return flow_map.sample(x0, steps)


__all__ = ["FlowMap", "Run", "RunFolder", "TrainingGraph", "compile_spec", "load_run", "load_spec", "resume", "sample",
           "train"]
