"""Components by name, discovered through entry points (docs/design.md, "Seams").

Groups: ``flowspec.objectives``, ``flowspec.interpolants``, ``flowspec.networks``,
``flowspec.datasets``, ``flowspec.metrics``. flowspec's own pyproject registers the built-ins in the
same groups, so a third-party package is found exactly as they are. A plugin that fails to import,
or whose entry point is not a subclass of the group's base class with a pydantic ``Options``, is
recorded with its error and does not break the others; two distributions registering one name
in one group is a conflict naming both. ``FLOWSPEC_BUILTINS_ONLY=1`` loads flowspec's own only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from flowspec.errors import UserError

GROUPS = ("objectives", "interpolants", "networks", "datasets", "metrics")
#: the key a spec section uses to name its component
DISCRIMINATORS = {"objectives": "characterization"}
#: the spec section each group fills
SECTIONS = {"objectives": "objective", "interpolants": "interpolant", "networks": "network",
            "datasets": "data", "metrics": "eval.metrics"}
BUILTINS_ONLY_ENV = "FLOWSPEC_BUILTINS_ONLY"


def discriminator(group: str) -> str:
    return DISCRIMINATORS.get(group, "kind")


@dataclass
class Component:
    """One registered component: where it comes from and, once loaded, the class or its error."""

    group: str
    name: str
    target: str
    distribution: str
    version: str
    obj: Any = None
    error: str | None = None

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}"


class Registry:
    """All components of all groups, loaded once.

    Args:
        builtins_only: load only flowspec's own components (default: the environment variable
            FLOWSPEC_BUILTINS_ONLY is set to something other than "" or "0").
    """

    def __init__(self, builtins_only: bool | None = None):
        if builtins_only is None:
            builtins_only = os.environ.get(BUILTINS_ONLY_ENV, "") not in ("", "0")
        self.builtins_only = builtins_only
        self._groups: dict[str, dict[str, Component]] = {}

    def components(self, group: str) -> dict[str, Component]:
        """name -> Component for one group, every entry point imported (failures recorded)."""
        if group not in GROUPS:
            raise KeyError(f"unknown component group {group!r}")
        if group not in self._groups:
            self._groups[group] = self._discover(group)
        return self._groups[group]

    def _discover(self, group: str) -> dict[str, Component]:
        found: dict[str, Component] = {}
        for ep in entry_points(group=f"flowspec.{group}"):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "?"
            if self.builtins_only and dist != "flowspec":
                continue
            prior = found.get(ep.name)
            if prior is not None:
                if prior.target == ep.value and prior.distribution == dist:
                    continue  # the same distribution seen twice on sys.path
                prior.error = (f"{group[:-1]} {ep.name!r} is registered by two distributions: "
                               f"{prior.distribution} ({prior.target}) and {dist} ({ep.value})")
                prior.obj = None
                continue
            comp = Component(group, ep.name, ep.value, dist, version)
            try:
                comp.obj = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                comp.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
            else:
                comp.error = _shape_error(group, ep.value, comp.obj)
                if comp.error is not None:
                    comp.obj = None
            found[ep.name] = comp
        return dict(sorted(found.items()))

    def names(self, group: str) -> list[str]:
        """Names that load (usable in a spec)."""
        return [n for n, c in self.components(group).items() if c.error is None]

    def get(self, group: str, name: str) -> Any:
        """The component class registered as ``name``, or a one-line UserError."""
        comp = self.components(group).get(name)
        key = f"{SECTIONS[group]}" + ("" if group == "metrics" else f".{discriminator(group)}")
        if comp is None:
            raise UserError(f"{key}: unknown {group[:-1]} {name!r} "
                            f"(known: {', '.join(self.names(group)) or 'none'})")
        if comp.error is not None:
            raise UserError(f"{key}: {group[:-1]} {name!r} from {comp.origin} is unusable: {comp.error}")
        return comp.obj


#: group -> (module, class) every component of the group must subclass
BASES = {"objectives": ("flowspec.objectives.base", "Objective"),
         "interpolants": ("flowspec.interpolants", "Interpolant"),
         "networks": ("flowspec.networks.base", "Network"),
         "datasets": ("flowspec.data.base", "Dataset"),
         "metrics": ("flowspec.metrics", "Metric")}


def _shape_error(group: str, target: str, obj: Any) -> str | None:
    """Why a loaded entry point cannot be used as a component of ``group`` (None if it can): it must
    be a subclass of the group's base class whose ``Options`` is a pydantic model."""
    import importlib

    from pydantic import BaseModel

    module, name = BASES[group]
    base = getattr(importlib.import_module(module), name)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return f"{target} is not a subclass of {module}.{name}"
    options = getattr(obj, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        return f"{target}.Options is not a pydantic model"
    return None


@lru_cache(maxsize=2)
def _default(builtins_only: bool) -> Registry:
    return Registry(builtins_only)


def default_registry() -> Registry:
    """The process-wide registry (respects FLOWSPEC_BUILTINS_ONLY)."""
    return _default(os.environ.get(BUILTINS_ONLY_ENV, "") not in ("", "0"))
