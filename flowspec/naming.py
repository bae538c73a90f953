"""What the command line calls a compiled graph: the method's name in the paper, and a one-line summary."""

from __future__ import annotations


def method_name(objective) -> str:
    o = objective.options
    names = {("lagrangian", "self"): "LSD", ("lagrangian", "teacher"): "LMD",
             ("eulerian", "self"): "ESD", ("eulerian", "teacher"): "EMD",
             ("eulerian", "conditional"): "MeanFlow (Eulerian consistency training)",
             ("progressive", "teacher"): "PD", ("flow_matching", "self"): "flow matching",
             ("fmm", "conditional"): "flow map matching", ("shortcut", "self"): "shortcut model"}
    if objective.characterization == "progressive" and o.target == "self":
        return "PSD-M" if o.gamma == "half" else "PSD-U"
    return names.get((objective.characterization, o.target), f"{objective.characterization} ({o.target})")


def describe(graph) -> str:
    return (f"{method_name(graph.objective)}, {graph.parameter_count():,} parameters, "
            f"device {graph.device}")
