"""The spec's models (pydantic v2): ``[train]``, ``[eval]``, ``[teacher]``, ``[log]``, and the component sections
(``[data]``, ``[interpolant]``, ``[network]``, ``[objective]``), discriminated unions over the registered
components on ``kind`` (``characterization`` for the objective). Each component's options are its own
pydantic model, so a plugin's options are validated and documented exactly like the built-ins'. Every
default lives here and shows in the resolved spec written to the run folder.

The Spec model is built at run time from the registry (:func:`spec_model`); :class:`SpecView` is the
static shape of every such model, the type the rest of flowspec is written against.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from flowspec.data.base import DatasetOptions
from flowspec.interpolants import InterpolantOptions
from flowspec.networks.base import NetworkOptions
from flowspec.objectives.base import ObjectiveOptions
from flowspec.ode import ODEOptions
from flowspec.registry import Registry, default_registry, discriminator

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
        "min(d, (1+k)/(10+k)); bias_corrected: weight (1-d)/(1-d^k) at update k, Adam's correction "
        "(no init bias)")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="seeds weights, data and times: a CPU run is reproducible bit for bit")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: at the end only)")
    log_every: int = Field(50, ge=1, description="steps between lines of metrics.jsonl")
    keep_checkpoints: int = Field(3, ge=0, description="newest checkpoints kept in the run folder (0: all)")
    precision: Literal["float32", "bf16", "float64"] = Field(
        "float32", description="float32; bf16: autocast to bfloat16 for the forward passes (weights, optimizer "
        "and jvps stay float32); float64: the whole run in double precision (with objective.jvp = "
        "\"finite_difference\", the float64 fallback for networks without forward-AD rules)")
    compile: bool = Field(
        False, description="torch.compile the whole loss, jvps included, and the network's plain forward passes")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient: stop the run (the last good checkpoint stays "
        "latest), or skip the step (no update; counted in metrics.jsonl as nonfinite_skipped)"
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per step (N): each process computes its B / W samples in N "
        "passes of B / (W N), gradients accumulated (equal to one pass on the whole batch)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp (DistributedDataParallel over the loss: replicated "
        "weights, gradients averaged in buckets during the backward) or fsdp (FSDP2 fully_shard per U-Net "
        "block and the network: weights, gradients and optimizer state sharded over the processes); "
        "ignored by one process")
    ddp_bucket_mb: float = Field(25.0, gt=0, description="ddp: gradient bucket size in MiB (DDP's bucket_cap_mb)")
    ddp_comm: Literal["fp32", "bf16"] = Field(
        "fp32", description="gradient communication: fp32 (the gradients' own dtype), or bf16 (DDP's "
        "bf16_compress_hook; with fsdp the reduce-scatter dtype); bf16 needs NCCL")


class EvalOptions(BaseModel):
    """``[eval]``: few-step quality of the EMA flow map."""

    model_config = ConfigDict(extra="forbid")
    steps: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 4, 8, 16], min_length=1, description="numbers of flow-map steps K to evaluate"
    )
    num_samples: int = Field(64_000, ge=1, description="samples per K")
    metrics: list[str] = Field(["kl", "energy"], description="registered metric names")
    metric_options: dict[str, dict[str, Any]] = Field(
        {}, description='options of the metrics by name, e.g. '
        '{fid = {weights = "pt_inception-2015-12-05-6726825d.pth"}}')
    every: int = Field(0, ge=0, description="steps between evaluations during training (0: at the end only)")
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="seed of the base samples shared by every K")
    plot: bool = Field(True, description="draw samples/steps-K.png (a 2-D histogram beside the exact or the "
                       "data's density; an image grid), loss.png and nfe.png")
    ode: list[ODEOptions] = Field(
        [], description='ODE baselines beside the flow-map rows, e.g. [{solver = "dopri5", rtol = 1e-5, '
        'atol = 1e-5}, {solver = "euler", steps = 16}] (keys: solver, steps, rtol, atol, velocity)')
    flow_map_error: bool = Field(
        True, description="when the dataset has a closed-form velocity: MSE of the learned X_{s,t} against "
        "the true map (dopri5) on a 5-point (s, t) grid and at (0, 1), and a flow_map_error column")
    flow_map_samples: int = Field(200, ge=1, description="samples per (s, t) pair for flow_map_error")


class TeacherOptions(BaseModel):
    """``[teacher]``: the frozen velocity of target = "teacher" (and of ``[eval] ode`` rows with
    velocity = "teacher")."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["analytic", "run"] = Field(
        ..., description='analytic: the exact velocity of the spec\'s own dataset; run: the EMA diagonal '
        'v_{t,t} of a flowspec run folder')
    path: str | None = Field(None, description='kind = "run": the run folder (its spec.toml and newest good '
                                                  'checkpoint are read), relative to the spec file\'s folder')

    @property
    def run_folder(self) -> str:
        """``path`` of a kind = "run" teacher (the validator makes it required there)."""
        assert self.kind == "run" and self.path is not None
        return self.path

    @model_validator(mode="after")
    def _check_path(self) -> TeacherOptions:
        if self.kind == "run" and not self.path:
            raise ValueError('kind = "run" needs path = "RUN_FOLDER"')
        if self.kind == "analytic" and self.path:
            raise ValueError('path is only read with kind = "run"')
        return self


#: the experiment trackers of ``[log] backends``, each with the module its extra installs
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "csv": None}


class LogOptions(BaseModel):
    """``[log]``: experiment tracking beside metrics.jsonl (flowspec.tracking). Not part of a run's
    identity: the backends may change when a run is resumed."""

    model_config = ConfigDict(extra="forbid")
    backends: list[Literal["tensorboard", "mlflow", "wandb", "csv"]] = Field(
        [], description='trackers, each given the resolved spec as params, every term of metrics.jsonl as '
        'metrics at its step, and the final eval table and plots as artifacts: "tensorboard" '
        '(RUN/tensorboard/), "mlflow" (RUN/mlruns/ unless mlflow_tracking_uri), "wandb" (RUN/wandb/, '
        'offline unless wandb_mode), "csv" (RUN/metrics.csv and RUN/params.csv)')
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, a database); default: a file store in RUN/mlruns")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment name; default: the run name")
    wandb_project: str = Field("flowspec", description="W&B project")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); default: W&B's own")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description='offline: files in RUN/wandb/ (upload later with `wandb sync`); online: '
        'to the W&B server (needs a login)')

    @field_validator("backends")
    @classmethod
    def _unique(cls, backends: list[str]) -> list[str]:
        twice = sorted({b for b in backends if backends.count(b) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        return backends


def _plain_name(name: str) -> str:
    if len(name.encode("utf-8", "surrogatepass")) > 100:
        raise ValueError("must be at most 100 bytes long (it names a folder, with a timestamp added)")
    if (not name or name.startswith(".") or re.search(r"[/\\\x00-\x1f]", name)
            or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)):
        raise ValueError("must be a plain folder name: not empty, no '/', '\\' or control "
                         "characters, not starting with '.'")
    return name


RunName = Annotated[str, AfterValidator(_plain_name)]


def section_model(model: type[BaseModel], section: str) -> type[BaseModel]:
    """The model of a fixed section (train, eval) of a Spec model."""
    annotation = model.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


class DataSpec(DatasetOptions):
    kind: str


class InterpolantSpec(InterpolantOptions):
    kind: str


class NetworkSpec(NetworkOptions):
    kind: str


class ObjectiveSpec(ObjectiveOptions):
    characterization: str


class SpecView(BaseModel):
    """What every Spec model has, statically: :func:`spec_model` derives the run-time model from it,
    replacing each component section by the union of the registered components' options (each
    of them a subclass of the section's options here)."""

    model_config = ConfigDict(extra="forbid")
    name: RunName = "run"
    data: DataSpec
    interpolant: InterpolantSpec
    network: NetworkSpec
    objective: ObjectiveSpec
    teacher: TeacherOptions | None = None
    train: TrainOptions = Field(default_factory=TrainOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    log: LogOptions = Field(default_factory=LogOptions)


@cache
def component_model(registry: Registry, group: str, name: str) -> type[BaseModel]:
    """The spec model of one component: its Options plus the literal discriminator field."""
    cls = registry.get(group, name)
    tag: Any = Literal[name]  # a literal of a run-time name
    return create_model(f"{cls.__name__}Spec", __base__=cls.Options,  # type: ignore[call-overload]
                        **{discriminator(group): (tag, Field(name, description=f"{group[:-1]} name"))})


def _section_type(registry: Registry, group: str) -> Any:
    models = [component_model(registry, group, n) for n in registry.names(group)]
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator=discriminator(group))]  # noqa: UP007 (a run-time list)


@lru_cache(maxsize=4)
def spec_model(registry: Registry | None = None) -> type[SpecView]:
    """The Spec model for the components in ``registry`` (default: the process-wide one)."""
    registry = registry or default_registry()
    name = Field("run", description="run name (default: the spec file's stem; +METHOD appended when --set "
                 "changes the method)")
    fields: dict[str, Any] = {"name": (RunName, name)}
    for section, group in COMPONENT_SECTIONS.items():
        kind = DEFAULT_KINDS.get(section)
        typ = _section_type(registry, group)
        if kind is None:
            fields[section] = (typ, ...)
        else:
            model = component_model(registry, group, kind)
            fields[section] = (typ, Field(default_factory=model))
    metric_names = tuple(registry.names("metrics"))
    names: Any = Literal[metric_names]  # the registered names, at run time
    eval_model = create_model("EvalSpec", __base__=EvalOptions,
                              metrics=(list[names], Field(["kl", "energy"], description="registered metric names")))
    fields["teacher"] = (TeacherOptions | None, Field(None, description="[teacher] (see below)"))
    fields["train"] = (TrainOptions, Field(default_factory=TrainOptions))
    fields["eval"] = (eval_model, Field(default_factory=eval_model))
    fields["log"] = (LogOptions, Field(default_factory=LogOptions))
    return create_model("Spec", __base__=SpecView, **fields)
