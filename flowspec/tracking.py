"""Experiment tracking beside metrics.jsonl (``[log] backends``), with the libraries themselves:
TensorBoard (torch.utils.tensorboard, RUN/tensorboard/), MLflow (a file store in RUN/mlruns/ unless
``log.mlflow_tracking_uri``), Weights & Biases (offline in RUN/wandb/ unless ``log.wandb_mode``) and
plain CSV (RUN/metrics.csv, RUN/params.csv).

Every tracker gets the resolved spec as params (dotted keys, :func:`spec_params`), every record of
metrics.jsonl as metrics at its step (:func:`record_metrics`: a training record's terms by their own
names, an evaluation's as ``eval/steps-K/METRIC``, ``eval/ode/LABEL/METRIC``,
``eval/flow_map_error/grid``), and at the end the eval table and the plots as artifacts. Only rank 0
tracks (flowspec.runlog). A resumed run continues the same MLflow and W&B run (found by the run
folder's key); TensorBoard drops the events after the checkpoint's step.

A tracker that fails to start stops the run at once (one line, exit 1); one that fails later warns
once and is dropped: tracking never loses a run.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from flowspec.atomic import atomic_text
from flowspec.errors import UserError
from flowspec.runs import read_records
from flowspec.spec import to_toml
from flowspec.spec.models import SpecView
from flowspec.tracked import Params, eval_markdown, record_metrics, run_key, spec_params


class Tracker:
    """One tracking backend of a run. Subclasses open their library in ``__init__`` and override
    what they record; every method is called on rank 0 only.

    Args:
        run_dir: the run folder.
        spec: the resolved spec.
        key: the run folder's key (the same when the run is resumed; another after ``--force``).
        resumed: the run continues from a checkpoint at ``step``.
    """

    name: ClassVar[str]

    def __init__(self, run_dir: Path, spec: SpecView, key: str, resumed: bool, step: int):
        self.run_dir, self.spec, self.key, self.resumed, self.step = run_dir, spec, key, resumed, step

    def params(self, params: Params) -> None:
        """The resolved spec, once, before any metric."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Metrics at a step."""

    def artifacts(self, step: int, files: list[Path], result: dict) -> None:
        """The end of the run: ``files`` (eval.json, the plots) and the eval table ``result``."""

    def close(self, status: str) -> None:
        """``status``: "finished", "failed" or "killed" (a signal or Ctrl-C)."""


class TensorBoard(Tracker):
    """Scalars, the spec (text and hparams), the eval table (text) and the plots (images) in
    RUN/tensorboard/ (read it with ``tensorboard --logdir RUN``)."""

    name = "tensorboard"

    def __init__(self, *args: Any):
        super().__init__(*args)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), flush_secs=10,
                                    purge_step=self.step + 1 if self.resumed else None)

    def params(self, params: Params) -> None:
        from torch.utils.tensorboard.summary import hparams

        events = self.writer.file_writer  # the hparams beside the scalars, in this run's own event file
        assert events is not None
        for summary in hparams(params, {}):
            events.add_summary(summary)
        self.writer.add_text("spec", "\n".join("    " + line for line in to_toml(self.spec).splitlines()))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def artifacts(self, step: int, files: list[Path], result: dict) -> None:
        import matplotlib.image

        self.writer.add_text("eval", eval_markdown(result), step)
        for path in files:
            if path.suffix == ".png":
                image = matplotlib.image.imread(path)[..., :3]
                tag = "plots/" + path.relative_to(self.run_dir).with_suffix("").as_posix()
                self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow(Tracker):
    """An MLflow run (params, metric history, artifacts) in experiment ``log.mlflow_experiment``
    (default: the run's name), tagged with the run folder; by default in a file store in RUN/mlruns
    (``mlflow ui --backend-store-uri RUN/mlruns``; MLflow 3 reads a file store with
    MLFLOW_ALLOW_FILE_STORE=true, which importing flowspec sets unless it is set)."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, *args: Any):
        super().__init__(*args)
        from mlflow.tracking import MlflowClient

        o = self.spec.log
        uri = o.mlflow_tracking_uri or (self.run_dir / "mlruns").resolve().as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        name = o.mlflow_experiment or self.spec.name
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                client.create_experiment(name)
            except Exception:  # another run created it just now (a shared tracking server)
                pass
            exp = client.get_experiment_by_name(name)
            assert exp is not None, name
        eid = exp.experiment_id
        found = client.search_runs([eid], filter_string=f"tags.`flowspec.key` = '{self.key}'",
                                   max_results=1) if self.resumed else []
        run = found[0] if found else client.create_run(
            eid, run_name=self.run_dir.name,
            tags={"flowspec.key": self.key, "flowspec.run_dir": str(self.run_dir.resolve())})
        self.run_id, self.logged = run.info.run_id, dict(run.data.params)
        if found:
            client.update_run(self.run_id, status="RUNNING")

    def params(self, params: Params) -> None:
        from mlflow.entities import Param

        # a resumed run keeps its params (MLflow cannot change one); [log] itself may have changed
        fresh = [Param(k[:250], str(v)[:500]) for k, v in params.items() if k[:250] not in self.logged]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i: i + 100])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def artifacts(self, step: int, files: list[Path], result: dict) -> None:
        for path in files:
            folder = path.parent.relative_to(self.run_dir).as_posix()
            self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self.STATUS[status])


class WandB(Tracker):
    """A Weights & Biases run in RUN/wandb/: offline unless ``log.wandb_mode = "online"``
    (upload an offline run later with ``wandb sync RUN/wandb/offline-run-*``); its id is the run
    folder's key, so a resumed run continues it."""

    name = "wandb"

    def __init__(self, *args: Any):
        super().__init__(*args)
        import wandb

        o = self.spec.log
        self.wandb = wandb
        self.run = wandb.init(project=o.wandb_project, entity=o.wandb_entity, mode=o.wandb_mode,
                              dir=str(self.run_dir), name=self.run_dir.name, id=self.key, resume="allow",
                              settings=wandb.Settings(silent=True, console="off"))

    def params(self, params: Params) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def artifacts(self, step: int, files: list[Path], result: dict) -> None:
        wandb = self.wandb
        images = {"plots/" + p.relative_to(self.run_dir).with_suffix("").as_posix(): wandb.Image(str(p))
                  for p in files if p.suffix == ".png"}
        self.run.log(images, step=step)
        artifact = wandb.Artifact(f"eval-{self.key}", type="evaluation")
        for path in files:
            folder = path.parent.relative_to(self.run_dir).as_posix()
            artifact.add_file(str(path), name=path.name if folder == "." else f"{folder}/{path.name}")
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class CSV(Tracker):
    """RUN/metrics.csv, one row per metric and step (``step,name,value``: ``pandas.read_csv(path)
    .pivot(index="step", columns="name", values="value")`` makes it wide), and RUN/params.csv
    (``key,value``). A resumed run's table is rebuilt from its (truncated) metrics.jsonl."""

    name = "csv"

    def __init__(self, *args: Any):
        super().__init__(*args)
        path = self.run_dir / "metrics.csv"
        rows = io.StringIO()
        table = csv.writer(rows, lineterminator="\n")
        table.writerow(["step", "name", "value"])
        if self.resumed:
            for record in read_records(self.run_dir):
                table.writerows([record["step"], k, repr(v)] for k, v in record_metrics(record).items())
        atomic_text(path, rows.getvalue())
        self.file = open(path, "a", encoding="utf-8", newline="")
        self.table = csv.writer(self.file, lineterminator="\n")

    def params(self, params: Params) -> None:
        rows = io.StringIO()
        csv.writer(rows, lineterminator="\n").writerows([["key", "value"], *params.items()])
        atomic_text(self.run_dir / "params.csv", rows.getvalue())

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.table.writerows([step, k, repr(v)] for k, v in values.items())
        self.file.flush()

    def close(self, status: str) -> None:
        self.file.close()


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "csv": CSV}


def _warn(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Trackers:
    """The trackers of ``spec.log.backends`` for a run folder, as one: each call goes to every
    tracker; one that fails warns once and is dropped.

    Raises:
        UserError: a tracker cannot start (exit 1), naming it.
    """

    def __init__(self, spec: SpecView, run_dir: Path, resumed: bool, step: int,
                 warn: Callable[[str], None] = _warn):
        self.warn, self.trackers = warn, []
        key = run_key(run_dir)
        try:
            for backend in spec.log.backends:
                try:
                    self.trackers.append(BACKENDS[backend](run_dir, spec, key, resumed, step))
                except ImportError as exc:
                    raise UserError(f"log.backends: \"{backend}\" needs the {backend} extra: "
                                    f"pip install 'flowspec[{backend}]' ({exc})", exit_code=1) from None
                except Exception as exc:  # any library's failure to start (a bad tracking URI, no login)
                    raise UserError(f"log.backends: {backend}: cannot start: {_first(exc)}", exit_code=1) from None
            self._each("params", spec_params(spec))
        except BaseException:
            self.close("failed")
            raise

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker never stops a run once it has started
                self.trackers.remove(tracker)
                self.warn(f"warning: log.backends: {tracker.name}: {_first(exc)}; no more tracking to it")
                _close(tracker, "failed")

    def log(self, record: dict) -> None:
        """One record of metrics.jsonl."""
        values = record_metrics(record)
        if values:
            self._each("metrics", int(record["step"]), values)

    def finish(self, step: int, files: list[Path], result: dict) -> None:
        self._each("artifacts", step, [p for p in files if p.is_file()], result)

    def close(self, status: str) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            _close(tracker, status)


def _close(tracker: Tracker, status: str) -> None:
    try:
        tracker.close(status)
    except Exception:  # closing after a failure: nothing more to tell
        pass


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
