"""What the command line calls a compiled graph: the method's name (each objective's own
``method_name()``, from its ``names``) and a one-line summary."""

from __future__ import annotations


def describe(graph) -> str:
    return (f"{graph.objective.method_name()}, {graph.parameter_count():,} parameters, "
            f"device {graph.device}")
