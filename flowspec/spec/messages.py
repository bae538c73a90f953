"""pydantic validation errors of a spec as one-line messages: ``FILE: dotted.key: what is wrong
(what would be valid)``, union tags removed from keys, long values cut."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from flowspec.errors import UserError, cut, short
from flowspec.ode import ODEOptions
from flowspec.registry import Registry, discriminator
from flowspec.spec.models import (
    COMPONENT_SECTIONS,
    DEFAULT_KINDS,
    TeacherOptions,
    component_model,
    section_model,
    spec_model,
)


def _valid_keys(loc: tuple, data: Mapping[str, Any], registry: Registry) -> list[str]:
    """The keys allowed in the table at ``loc`` (for 'unknown key' messages)."""
    model = spec_model(registry)
    if len(loc) == 0:
        return list(model.model_fields)
    section = loc[0]
    if section in COMPONENT_SECTIONS and len(loc) == 1:
        group = COMPONENT_SECTIONS[section]
        raw = data.get(section, {})
        name = raw.get(discriminator(group), DEFAULT_KINDS.get(section)) if isinstance(raw, dict) else None
        try:
            return list(component_model(registry, group, name).model_fields)
        except UserError:
            return []
    if section in ("train", "eval", "log") and len(loc) == 1:
        return list(section_model(model, section).model_fields)
    if section == "teacher" and len(loc) == 1:
        return list(TeacherOptions.model_fields)
    if section == "eval" and len(loc) == 3 and loc[1] == "ode":
        return list(ODEOptions.model_fields)
    return []


def _unusable(registry: Registry, group: str, name: Any) -> str | None:
    """'GROUP 'NAME' from DIST VERSION is unusable: ERROR' when ``name`` is a registered component that
    failed to load (import error, or the same name from two distributions), else None."""
    comp = registry.components(group).get(name) if isinstance(name, str) else None
    if comp is None or comp.error is None:
        return None
    return f"{group[:-1]} {name!r} from {comp.origin} is unusable: {comp.error}"


def _component_name_error(err: ErrorDetails, loc: list, registry: Registry) -> str | None:
    """The message for a component name that is registered but unusable (a failing plugin)."""
    if not loc:
        return None
    if loc[0] == "eval" and len(loc) >= 2 and loc[1] == "metrics" and err["type"] == "literal_error":
        return _unusable(registry, "metrics", err.get("input"))
    group = COMPONENT_SECTIONS.get(loc[0])
    if group is None:
        return None
    if err["type"] == "union_tag_invalid":
        return _unusable(registry, group, err.get("ctx", {}).get("tag"))
    if err["type"] == "literal_error" and loc[-1] == discriminator(group):  # a one-member union
        return _unusable(registry, group, err.get("input"))
    return None


def _describe(err: ErrorDetails) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "missing":
        return "missing (required)"
    if kind == "literal_error":
        valid = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{short(got)} is not valid (valid: {valid})"
    if kind == "union_tag_invalid":
        valid = ctx.get("expected_tags", "").replace("'", "")
        return f"unknown name {ctx.get('tag')!r} (known: {valid})"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    msg = msg.replace("input should be", "must be")
    return f"{msg} (got {short(got)})" if not isinstance(got, (dict, list)) else msg


def format_errors(exc: ValidationError, data: Mapping[str, Any], source: str, registry: Registry) -> list[str]:
    """pydantic errors -> ``source: dotted.key: message`` lines (union tags removed from keys)."""
    lines: list[str] = []
    alternatives: dict[str, tuple[Any, list[str]]] = {}
    for err in exc.errors(include_url=False):
        loc: list[Any] = list(err["loc"])
        if loc and loc[0] in COMPONENT_SECTIONS and len(loc) > 1 and err["type"] != "union_tag_invalid":
            raw = data.get(loc[0])
            if isinstance(raw, dict) and raw.get(discriminator(COMPONENT_SECTIONS[loc[0]])) == loc[1]:
                del loc[1]  # pydantic puts the union tag in the location
            elif not isinstance(raw, dict) and loc[1] == DEFAULT_KINDS.get(loc[0]):
                del loc[1]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(discriminator(COMPONENT_SECTIONS[loc[0]]))
        if len(loc) > 1 and isinstance(loc[-1], str) and UNION_MEMBER.match(loc[-1]):
            key = cut(".".join(str(p) for p in loc[:-1]))  # one line for all the members of a plain union
            alternatives.setdefault(key, (err.get("input"), []))[1].append(_alternative(loc[-1], err))
            line = f"{source}: {key}: " + "\0"
            if line not in lines:
                lines.append(line)
            continue
        key = cut(".".join(str(p) for p in loc)) or "(top level)"
        if err["type"] == "union_tag_not_found":
            known = ", ".join(registry.names(COMPONENT_SECTIONS[loc[0]]))
            text = f"missing {loc[-1]} (known: {known})"
        elif err["type"] == "extra_forbidden":
            valid = _valid_keys(tuple(loc[:-1]), data, registry)
            text = "unknown key" + (f" (valid: {', '.join(valid)})" if valid else "")
        else:
            text = _component_name_error(err, loc, registry) or _describe(err)
        line = f"{source}: {key}: {text}"
        if line not in lines:
            lines.append(line)
    for key, (got, alts) in alternatives.items():
        index = lines.index(f"{source}: {key}: " + "\0")
        lines[index] = f"{source}: {key}: {short(got)} is not valid (valid: {', '.join(alts)})"
    return lines


#: how pydantic names the members of a plain (undiscriminated) union in an error location
UNION_MEMBER = re.compile(r"^((constrained-)?(float|int|str|bool)|none|(literal|list|dict|tuple)\[.*\])$")


def _alternative(member: str, err: ErrorDetails) -> str:
    """What one member of a union would accept, for a merged union error."""
    if err["type"] == "literal_error":
        return err.get("ctx", {}).get("expected", member).replace("'", "").replace(" or ", ", ")
    noun = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false"}.get(
        member.removeprefix("constrained-"))
    if noun is None:
        return member
    if err["type"].endswith(("_type", "_parsing")):
        return noun
    return f"{noun} {err['msg'].removeprefix('Input should be ')}"
