"""Distillation targets b-hat (docs/math.md, "Losses"): anything with ``velocity(t, x)``.

A teacher also offers a map velocity ``v(s, t, x)`` = (X_{s,t}(x) - x) / (t - s): the model's own map
for self-distillation, and for a frozen teacher its ODE xdot = b_t(x) integrated over [s, t]
(flowspec.ode.map_velocity; the progressive objectives integrate with their own teacher_* options).
Teachers are always evaluated under stop-gradient. The protocol they meet,
:class:`flowspec.objectives.base.Teacher`, lives beside the objectives that call it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from flowspec import runfolder
from flowspec.errors import UserError
from flowspec.flowmap import FlowMap
from flowspec.runs import RunFolder


class SelfTeacher:
    """Self-distillation: the model's own diagonal sg(v_{t,t}(x)) and its own map sg(v_{s,t}(x)).

    Args:
        flow_map: the model being trained (current parameters, the paper's default), or its EMA copy.
    """

    def __init__(self, flow_map: FlowMap):
        self.flow_map = flow_map

    @torch.no_grad()
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.flow_map.velocity(t, x)

    @torch.no_grad()
    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.flow_map.v(s, t, x)


class VelocityTeacher:
    """A frozen velocity as teacher (an analytic b_t, or any callable): ``velocity`` is it, under
    no_grad, and its map velocity v_{s,t} is its ODE integrated over [s, t] (flowspec.ode.map_velocity).

    Args:
        velocity: b(t, x), t (B,), x (B, ...) -> shaped like x.
    """

    def __init__(self, velocity):
        self._velocity = velocity

    @torch.no_grad()
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._velocity(t, x)

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from flowspec.ode import map_velocity

        return map_velocity(self.velocity, s, t, x)[0]


class FlowMapTeacher:
    """A frozen flowspec flow map as teacher: velocity = its diagonal v_{t,t}; its map is the ODE of
    that velocity integrated over [s, t] (flowspec.ode.map_velocity), not the network's own
    off-diagonal (a flow-matching run trains only the diagonal)."""

    def __init__(self, flow_map: FlowMap, source: str = ""):
        self.flow_map = flow_map.requires_grad_(False).eval()
        self.source = source
        self.pin: dict | None = None

    @torch.no_grad()
    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.flow_map.velocity(t, x)

    def v(self, s: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from flowspec.ode import map_velocity

        return map_velocity(self.velocity, s, t, x)[0]


def load_run_teacher(path: str, device: torch.device, shape: tuple[int, ...]) -> FlowMapTeacher:
    """The EMA flow map of a run folder, frozen (:meth:`flowspec.runs.RunFolder.flow_map`: only its
    network built, its newest good checkpoint loaded, every byte verified). The teacher's ``pin``
    records the run and the checkpoint's digest (a student's checkpoints keep it, and a resume
    refuses another teacher).

    The teacher's own [teacher] is not loaded (its network is all a student needs); a cycle of
    teacher runs is refused when the spec is checked (flowspec.checks.check_teacher).

    Raises:
        UserError: not a run folder, this run's own folder, no good checkpoint, or a data shape
        other than ``shape``.
    """
    run = RunFolder(path, label="teacher.path: ")
    key = run.path.resolve()
    own = runfolder.own_run[0]
    if own is not None and key == Path(own).resolve():
        raise UserError(f"teacher.path: {path}: is this run's own folder (a run cannot teach itself)")
    def warn(line: str) -> None:
        sys.stderr.write(f"{line} (teacher)\n")

    loaded = run.flow_map(device.type, warn=warn)
    if loaded.shape != tuple(shape):
        raise UserError(f"teacher.path: {path}: the teacher's data shape {loaded.shape} "
                        f"differs from this spec's {tuple(shape)}")
    teacher = FlowMapTeacher(loaded.flow_map.to(device), f"{path} ({loaded.checkpoint.name})")
    teacher.pin = {"run": str(key), "checkpoint": loaded.checkpoint.name, "sha256": loaded.digest}
    return teacher
