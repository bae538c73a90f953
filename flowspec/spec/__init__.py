"""The spec: a TOML file validated by pydantic v2 (docs/design.md, "Data flow").

* :mod:`flowspec.spec.models`: the sections' models and the Spec model built from the registry;
* :mod:`flowspec.spec.load`: reading, ``--set`` overrides, validation, the resolved spec written back;
* :mod:`flowspec.spec.messages`: pydantic's errors as one-line messages naming the file and the key;
* :mod:`flowspec.spec.reference`: the spec reference (docs/spec.md).
"""

from flowspec.spec.load import apply_overrides, load_spec, read_toml, to_toml, tomllib, validate
from flowspec.spec.models import (
                                  COMPONENT_SECTIONS,
                                  DEFAULT_KINDS,
                                  EvalOptions,
                                  LogOptions,
                                  SpecView,
                                  TeacherOptions,
                                  TrainOptions,
                                  component_model,
                                  spec_model,
)

__all__ = ["COMPONENT_SECTIONS", "DEFAULT_KINDS", "EvalOptions", "LogOptions", "SpecView", "TeacherOptions",
           "TrainOptions", "apply_overrides", "component_model", "load_spec", "read_toml", "spec_model", "to_toml",
           "tomllib", "validate"]
