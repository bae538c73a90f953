"""The spec: a TOML file validated by pydantic v2 (DESIGN.md, "Data flow").

Component sections (``[data]``, ``[interpolant]``, ``[network]``, ``[objective]``) are discriminated
unions over the registered components, on ``kind`` (``characterization`` for the objective); each
component's options are its own pydantic model, so a plugin's options are validated and documented
exactly like the built-ins'. ``[train]`` and ``[eval]`` are fixed. Every default lives in these
models and shows in the resolved spec written to the run folder. Every mistake is reported at once,
one line each: ``FILE: dotted.key: what is wrong (what would be valid)``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from flowspec.errors import UserError
from flowspec.ode import ODEOptions
from flowspec.registry import Registry, default_registry, discriminator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: spec section -> registry group, for the component sections
COMPONENT_SECTIONS = {"data": "datasets", "interpolant": "interpolants",
                      "network": "networks", "objective": "objectives"}
DEFAULT_KINDS = {"interpolant": "linear", "network": "mlp"}


class TrainOptions(BaseModel):
    """``[train]``: the optimization."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(1024, ge=1, description="samples per step (B)")
    optimizer: Literal["adam", "radam"] = "radam"
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    schedule: Literal["constant", "cosine", "sqrt"] = Field(
        "constant", description="constant; cosine to 0 over the run; sqrt: lr / sqrt(max(1, step / decay_start)) "
        "(the reference code's, decay_start = 35000 at the paper's budget)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    decay_start: int = Field(1000, ge=1, description="sqrt schedule: step where the decay begins")
    grad_clip: float = Field(10.0, ge=0, description="max global gradient norm; 0 disables clipping")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay d (0: the EMA is the current weights)")
    ema_schedule: Literal["plain", "warmup", "bias_corrected"] = Field(
        "warmup", description="plain: decay d from the initial weights (the reference code); warmup: "
        "min(d, (1+k)/(10+k)); bias_corrected: weight (1-d)/(1-d^k) at update k, Adam's correction (no init bias)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds weights, data and times: a CPU run is reproducible bit for bit")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: at the end only)")
    log_every: int = Field(50, ge=1, description="steps between lines of metrics.jsonl")
    keep_checkpoints: int = Field(3, ge=0, description="newest checkpoints kept in the run folder (0: all)")
    precision: Literal["float32", "bf16", "float64"] = Field(
        "float32", description="float32; bf16: autocast to bfloat16 for the forward passes (weights, optimizer "
        "and jvps stay float32); float64: the whole run in double precision (with objective.jvp = "
        "\"finite_difference\", the float64 fallback for networks without forward-AD rules)")
    compile: bool = Field(False, description="torch.compile the network's plain forward passes (jvps run eagerly)")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient: stop the run (the last good checkpoint stays "
        "latest), or skip the step (no update; counted in metrics.jsonl as nonfinite_skipped)"
    )


class EvalOptions(BaseModel):
    """``[eval]``: few-step quality of the EMA flow map."""

    model_config = ConfigDict(extra="forbid")
    steps: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 4, 8, 16], min_length=1, description="numbers of flow-map steps K to evaluate"
    )
    num_samples: int = Field(64_000, ge=1, description="samples per K")
    metrics: list[str] = Field(["kl", "energy"], description="registered metric names")
    metric_options: dict[str, dict[str, Any]] = Field(
        {}, description='options of the metrics by name, e.g. {fid = {weights = "pt_inception-2015-12-05-6726825d.pth"}}')
    every: int = Field(0, ge=0, description="steps between evaluations during training (0: at the end only)")
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="seed of the base samples shared by every K")
    plot: bool = Field(True, description="write samples/steps-K.png")
    ode: list[ODEOptions] = Field(
        [], description='ODE baselines beside the flow-map rows, e.g. [{solver = "dopri5", rtol = 1e-5, '
        'atol = 1e-5}, {solver = "euler", steps = 16}] (keys: solver, steps, rtol, atol, velocity)')
    flow_map_error: bool = Field(
        True, description="when the dataset has a closed-form velocity: MSE of the learned X_{s,t} against "
        "the true map (dopri5) on a 5-point (s, t) grid and at (0, 1), and a flow_map_error column")
    flow_map_samples: int = Field(200, ge=1, description="samples per (s, t) pair for flow_map_error")


def _plain_name(name: str) -> str:
    if len(name.encode("utf-8", "surrogatepass")) > 100:
        raise ValueError("must be at most 100 bytes long (it names a folder, with a timestamp added)")
    if (not name or name.startswith(".") or re.search(r"[/\\\x00-\x1f]", name)
            or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)):
        raise ValueError("must be a plain folder name: not empty, no '/', '\\' or control "
                         "characters, not starting with '.'")
    return name


RunName = Annotated[str, AfterValidator(_plain_name)]


@lru_cache(maxsize=None)
def component_model(registry: Registry, group: str, name: str) -> type[BaseModel]:
    """The spec model of one component: its Options plus the literal discriminator field."""
    cls = registry.get(group, name)
    key = discriminator(group)
    return create_model(f"{cls.__name__}Spec", __base__=cls.Options,
                        **{key: (Literal[name], Field(name, description=f"{group[:-1]} name"))})


def _section_type(registry: Registry, group: str) -> Any:
    models = [component_model(registry, group, n) for n in registry.names(group)]
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator=discriminator(group))]


@lru_cache(maxsize=4)
def spec_model(registry: Registry | None = None) -> type[BaseModel]:
    """The Spec model for the components in ``registry`` (default: the process-wide one)."""
    registry = registry or default_registry()
    fields: dict[str, Any] = {"name": (RunName, Field("run", description="run name (default: the spec file's stem)"))}
    for section, group in COMPONENT_SECTIONS.items():
        kind = DEFAULT_KINDS.get(section)
        typ = _section_type(registry, group)
        if kind is None:
            fields[section] = (typ, ...)
        else:
            model = component_model(registry, group, kind)
            fields[section] = (typ, Field(default_factory=model))
    metric_names = tuple(registry.names("metrics"))
    eval_model = create_model("EvalSpec", __base__=EvalOptions,
                              metrics=(list[Literal[metric_names]], Field(["kl", "energy"],
                                       description="registered metric names")))
    from flowspec.teachers import TeacherOptions

    fields["teacher"] = (Optional[TeacherOptions], Field(None, description="[teacher] (see below)"))
    fields["train"] = (TrainOptions, Field(default_factory=TrainOptions))
    fields["eval"] = (eval_model, Field(default_factory=eval_model))
    return create_model("Spec", __config__=ConfigDict(extra="forbid"), **fields)


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


def validate(data: Mapping[str, Any], source: str = "<spec>", registry: Registry | None = None) -> BaseModel:
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


def cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (long keys and values in one-line messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = 80) -> str:
    return cut(repr(value), limit)


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
_LEGACY_DEFAULTS = {"mlp": {"times": "s_dt", "scale": 1.0, "init": "torch"},
                    "unet": {"time_embedding": "positional"}}


def _legacy_network(raw: dict, path: Path) -> dict:
    """A run folder's resolved spec.toml keeps meaning the network it trained: keys added since it was
    written take the values it used, not today's defaults (a resolved spec lists every key)."""
    net = raw.get("network")
    if path.name != "spec.toml" or not (path.parent / "environment.json").is_file() or not isinstance(net, dict):
        return raw
    missing = {k: v for k, v in _LEGACY_DEFAULTS.get(net.get("kind", "mlp"), {}).items() if k not in net}
    return {**raw, "network": {**net, **missing}} if missing else raw


def load_spec(path: str | Path, overrides: Sequence[str] = (), registry: Registry | None = None) -> BaseModel:
    """Read, override (``--set``) and validate a spec file. The run name defaults to the file stem."""
    raw = _legacy_network(read_toml(path), Path(path))
    if not raw and not overrides:
        raise UserError(f"{path}: the spec is empty (it needs at least [data] and [objective])")
    data = apply_overrides(raw, overrides)
    data.setdefault("name", Path(path).stem)
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


def to_toml(spec: BaseModel) -> str:
    """The resolved spec (every default filled in) as TOML that reads back to the same spec."""
    data = spec.model_dump(mode="json", exclude_none=True)
    head = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    parts = ["\n".join(head)] if head else []
    for k, v in data.items():
        if isinstance(v, dict):
            body = "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
            parts.append(f"[{k}]\n{body}")
    return "\n\n".join(parts) + "\n"


def reference(registry: Registry | None = None) -> str:
    """Markdown reference of every spec section and every registered component's options
    (:func:`flowspec.reference.reference`)."""
    from flowspec.reference import reference as markdown

    return markdown(registry)


def format_errors(exc: ValidationError, data: Mapping[str, Any], source: str, registry: Registry) -> list[str]:
    """pydantic errors as one-line messages (:func:`flowspec.specerrors.format_errors`)."""
    from flowspec.specerrors import format_errors as lines

    return lines(exc, data, source, registry)
