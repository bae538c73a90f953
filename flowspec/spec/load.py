"""Loading a spec: read the TOML file, apply ``--set`` overrides, validate against the Spec model
(:mod:`flowspec.spec.models`), every mistake at once, one line each: ``FILE: dotted.key: what is
wrong (what would be valid)`` (:mod:`flowspec.spec.messages`); and writing the resolved spec back.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowspec.errors import UserError, cut
from flowspec.registry import Registry, default_registry
from flowspec.spec.messages import format_errors
from flowspec.spec.models import SpecView, spec_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# -- loading ----------------------------------------------------------------------------------------

def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``a.b=c`` strings -> (["a", "b"], value); the value is read as TOML, else kept as text."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
            raise UserError(f"--set {cut(item)}: expected section.key=value (e.g. train.steps=100)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        except RecursionError:
            raise UserError(f"--set {cut(key.strip())}: the value is nested too deeply "
                            f"(at most {MAX_DEPTH} levels)") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {cut('.'.join(path))}: {cut(part, 40)} is not a table")
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file; errors are one line with the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: TOML syntax error: {cut(str(exc), 200)}") from None
    except RecursionError:
        raise UserError(f"{path}: TOML: values nested too deeply (at most {MAX_DEPTH} levels)") from None


def validate(data: Mapping[str, Any], source: str = "<spec>", registry: Registry | None = None) -> SpecView:
    """Validate a spec dict; all errors at once as a UserError of one-line messages."""
    model = spec_model(registry)
    deep = too_deep(data)
    if deep is not None:
        raise UserError(f"{source}: {cut('.'.join(deep.split('.')[:2]))}: nested more than {MAX_DEPTH} levels deep")
    lines = [f"{source}: {cut(key)}: must be a finite number (got {value!r})" for key, value in _leaves(data)
             if isinstance(value, float) and not math.isfinite(value)]
    try:
        spec = model.model_validate(dict(data))
    except ValidationError as exc:
        taken = tuple(line.rsplit(": ", 1)[0] + ":" for line in lines)
        lines += [line for line in format_errors(exc, data, source, registry or default_registry())
                  if not line.startswith(taken)]
        raise UserError(lines) from None
    validated = dict(_leaves(spec.model_dump()))
    lines += [f"{source}: {key}: must be a number, not a boolean (got {str(value).lower()})"
              for key, value in _leaves(data) if isinstance(value, bool) and not isinstance(validated.get(key), bool)]
    if lines:
        raise UserError(lines)
    return spec


#: nesting of tables and arrays a spec may have (real specs have 3 or 4)
MAX_DEPTH = 32


def too_deep(data: Any) -> str | None:
    """The dotted key of the first value nested more than MAX_DEPTH levels deep, or None (iterative:
    no recursion however deep the input)."""
    stack = [(data, "", 0)]
    while stack:
        node, key, depth = stack.pop()
        if depth > MAX_DEPTH:
            return key or "(top level)"
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(v, (Mapping, list)):
                stack.append((v, f"{key}.{k}" if key else str(k), depth + 1))
    return None


def _leaves(data: Any, prefix: str = ""):
    """(dotted key, value) for every scalar in nested dicts and lists (list items keyed by index)."""
    items = data.items() if isinstance(data, Mapping) else enumerate(data)
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, (Mapping, list)):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


#: keys a resolved spec written before they existed lacks, with the value that run was trained with
#: (the defaults changed to the paper's networks; docs/networks.md)
_LEGACY_DEFAULTS: dict[str, dict[str, object]] = {"mlp": {"times": "s_dt", "scale": 1.0, "init": "torch"},
                    "unet": {"time_embedding": "positional"}}


def _legacy_network(raw: dict, path: Path) -> dict:
    """A run folder's resolved spec.toml keeps meaning the network it trained: keys added since it was
    written take the values it used, not today's defaults (a resolved spec lists every key)."""
    net = raw.get("network")
    if path.name != "spec.toml" or not (path.parent / "environment.json").is_file() or not isinstance(net, dict):
        return raw
    missing = {k: v for k, v in _LEGACY_DEFAULTS.get(net.get("kind", "mlp"), {}).items() if k not in net}
    return {**raw, "network": {**net, **missing}} if missing else raw


def method_of(objective: Any, registry: Registry) -> str | None:
    """The method an ``[objective]`` table names ("LSD", "PSD-M": the objective's ``method_name()``),
    or None when it names none (validation then says what is wrong)."""
    if not isinstance(objective, Mapping) or not isinstance(objective.get("characterization"), str):
        return None
    try:
        cls = registry.get("objectives", objective["characterization"])
        return cls(cls.Options(**{k: v for k, v in objective.items() if k in cls.Options.model_fields})).method_name()
    except Exception:  # any invalid table (a plugin's options may raise anything): validation reports it
        return None


def run_name(name: str, before: str | None, after: str | None) -> str:
    """The run's name when ``--set`` took the spec from method ``before`` to ``after``: ``name+after``
    in lower case with dashes (checkerboard-lsd with --set objective.characterization=eulerian:
    checkerboard-lsd+esd), so that the folder, the progress lines and the plots say what was trained;
    ``name`` itself when the method is unchanged, unknown, or the result would be too long a name."""
    if before is None or after is None or before == after:
        return name
    renamed = f"{name}+{re.sub(r'[^a-z0-9]+', '-', after.lower()).strip('-')}"
    return renamed if len(renamed.encode("utf-8", "surrogatepass")) <= 100 else name


def load_spec(path: str | Path, overrides: Sequence[str] = (), registry: Registry | None = None) -> SpecView:
    """Read, override (``--set``) and validate a spec file. The run name defaults to the file stem;
    when the overrides change the method (and do not set the name), :func:`run_name` says so."""
    raw = _legacy_network(read_toml(path), Path(path))
    if not raw and not overrides:
        raise UserError(f"{path}: the spec is empty (it needs at least [data] and [objective])")
    keys = [".".join(key) for key, _ in parse_overrides(overrides)]
    method = any(k.startswith("objective.") or k == "objective" for k in keys) and "name" not in keys
    before = method_of(raw.get("objective"), registry or default_registry()) if method else None
    data = apply_overrides(raw, overrides)
    data.setdefault("name", Path(path).stem)
    if method and isinstance(data["name"], str):
        data["name"] = run_name(data["name"], before, method_of(data.get("objective"), registry or default_registry()))
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("path"), str) and teacher["path"]:
        # a teacher run relative to the spec file's folder, stored absolute in the resolved spec
        teacher["path"] = os.path.abspath(Path(path).parent / Path(teacher["path"]).expanduser())
    return validate(data, str(path), registry)


# -- writing the resolved spec ----------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(spec: SpecView) -> str:
    """The resolved spec (every default filled in) as TOML that reads back to the same spec."""
    data = spec.model_dump(mode="json", exclude_none=True)
    head = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    parts = ["\n".join(head)] if head else []
    for k, v in data.items():
        if isinstance(v, dict):
            body = "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
            parts.append(f"[{k}]\n{body}")
    return "\n\n".join(parts) + "\n"
