"""What a tracker of ``[log] backends`` receives (flowspec.tracking): the resolved spec as flat
params, each record of metrics.jsonl as flat metric names, the eval table as markdown, and the key
that names one run folder's run in MLflow and W&B.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from flowspec.spec.models import SpecView

Params = dict[str, Any]
#: characters MLflow refuses in a metric name (it allows letters, digits, _ - . space and /)
_UNSAFE = re.compile(r"[^\w\-. /]")


def spec_params(spec: SpecView) -> dict[str, str | int | float | bool]:
    """The resolved spec as flat params: dotted keys, lists and absent values as JSON text."""
    out: dict[str, str | int | float | bool] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)

    walk(spec.model_dump(mode="json"), "")
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_metrics(record: dict) -> dict[str, float]:
    """A record of metrics.jsonl as flat metric names and finite numbers (nulls and text left out)."""
    out: dict[str, float] = {}

    def walk(value: Any, parts: list[str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*parts, str(k)])
        elif _number(value):
            out[_UNSAFE.sub("_", "/".join(parts))] = float(value)

    for key, value in record.items():
        if key == "step":
            continue
        if key == "eval" and isinstance(value, dict):
            for k, row in value.items():
                walk(row, ["eval", f"steps-{k}"])
        else:
            walk(value, ["eval", key] if isinstance(value, dict) else [key])
    return out


def eval_markdown(result: dict) -> str:
    """An eval.json-shaped result as a markdown table: one row per sampler, one column per number."""
    rows = {**{f"{k} steps": r for k, r in (result.get("steps") or {}).items()},
            **{f"ODE {k}": r for k, r in (result.get("ode") or {}).items()}}
    cols = list(dict.fromkeys(c for r in rows.values() for c, v in r.items() if _number(v)))
    lines = ["| sampler | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.5g}" if _number(r.get(c)) else "-" for c in cols) + " |")
    return "\n".join(lines)


def _toml(spec: SpecView) -> str:
    from flowspec.spec import to_toml

    return to_toml(spec)


def run_key(run_dir: Path) -> str:
    """16 hex digits naming one run folder's run: its absolute path and the start time in its
    environment.json (kept on resume, written anew by ``--force``)."""
    try:
        started = json.loads((run_dir / "environment.json").read_text(encoding="utf-8")).get("started", "")
    except (OSError, ValueError):
        started = ""
    return hashlib.sha256(f"{run_dir.resolve()}\n{started}".encode()).hexdigest()[:16]
