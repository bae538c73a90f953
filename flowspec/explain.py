"""``flowspec explain``: a compiled training graph in words, the objective's whole formula last."""

from __future__ import annotations

import inspect
import sys
import textwrap

from rich.markup import escape

from flowspec.engine import TrainingGraph
from flowspec.objectives.base import Objective
from flowspec.spec.models import SpecView


def formula(objective: Objective) -> str:
    """The loss an objective trains, as ``explain`` prints it: its ``formula`` attribute; else its
    module's docstring after the summary paragraph, every paragraph of it (a formula may span several);
    else its class docstring. Common indentation removed, lines right-stripped, nothing cut."""
    cls = type(objective)
    text = cls.formula
    if not text.strip():
        doc = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
        paragraphs = doc.split("\n\n")
        text = "\n\n".join(paragraphs[1:]) if len(paragraphs) > 1 else doc
    if not text.strip():
        text = inspect.cleandoc(cls.__doc__ or "")
    return "\n".join(line.rstrip() for line in textwrap.dedent(text).strip("\n").splitlines())


def explain(s: SpecView, g: TrainingGraph) -> str:
    """The text ``flowspec explain`` prints (rich markup: the first line in bold)."""
    obj = g.objective
    o = obj.options
    lines = [
        f"[bold]{escape(s.name)}[/]: {escape(obj.method_name())}",
        f"  characterization  {obj.characterization}; target {o.target}; diagonal fraction eta = {o.diagonal_fraction}",
        f"  data              {s.data.kind}, shape {tuple(g.dataset.shape)}",
        f"  interpolant       {s.interpolant.kind}; base x0 ~ N(0, c^2 I), c = {s.interpolant.base_scale}"
        + (f" = {[round(v, 4) for v in g.base.scale.flatten().tolist()]}"
           if s.interpolant.base_scale == "data_std" else ""),
        f"  network           {s.network.kind}: {g.parameter_count():,} parameters; X = x + (t - s) v(s, t, x)"
        + (f", v = {g.model.scale:g} net(x / {g.model.scale:g}, s, t)" if g.model.scale != 1.0 else ""),
        f"  device            {g.device}",
        f"  optimizer         {s.train.optimizer}, lr {s.train.lr} ({s.train.schedule}), clip {s.train.grad_clip}, "
        f"EMA {s.train.ema} ({s.train.ema_schedule}), {s.train.steps} steps of batch {s.train.batch_size}",
        f"  cost per step     ((1 - eta) c_D + eta) B with c_D = {obj.cost_formula()}, C = 1.5: "
        f"~{obj.step_cost() * s.train.batch_size:,.0f} forward passes ({obj.step_cost():.2f} x flow matching)"
        + (f"\n                    {escape(obj.teacher_cost())} per off-diagonal sample"
           if obj.teacher_cost() else ""),
        f"  evaluation        K in {s.eval.steps}, {s.eval.num_samples} samples, metrics {', '.join(s.eval.metrics)}",
    ]
    text = formula(obj)
    if text:
        lines += ["", "  objective:", *(f"    {escape(line)}" if line else "" for line in text.splitlines())]
    return "\n".join(lines)
