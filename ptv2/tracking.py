"""MLflow, behind one boundary: the only module of ptv2 and the launcher that imports MLflow or
spells out its tag names.

`Tracker` is one tracking store (the embedded SQLite store under $PTV2_HOME, or a server) as
ptv2 uses it: typed runs (`RunRecord`), their lifecycle (start, reopen, end), metrics, the
checkpoint digests a resume trusts, sweeps' parent and trial runs, and the prompt registry. The
driver owns a run (creates and ends it); rank 0 of the workers attaches to it by id and logs
through `ptv2.callbacks.MlflowCallback`.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ptv2.errors import first_line

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# ptv2's tags on a run (values are strings)
JOB_ID, STORAGE, STATUS, ERROR, STEPS = "ptv2.job_id", "ptv2.storage", "ptv2.status", "ptv2.error", "ptv2.steps"
KIND, SWEEP_ID, TRIAL, EARLY_STOPPED = "ptv2.kind", "ptv2.sweep_id", "ptv2.trial", "ptv2.early_stopped"
SWEEP_METRIC, SWEEP_MODE = "ptv2.sweep_metric", "ptv2.sweep_mode"
SWEEP_BEST, BEST_RUN = "ptv2.sweep_best", "ptv2.best_run_id"
STOPPED, STOPPED_AT = "ptv2.stopped_early", "ptv2.stopped_at_step"  # early stopping: why, and when
EVALUATES, EVALUATES_MODEL = "ptv2.evaluates", "ptv2.evaluates_model"  # an evaluation run's prompt
LAST_EVALUATION = "ptv2.last_evaluation"  # on a registered version: its newest evaluation run
DRIVER = "ptv2.driver"  # "<process owner>:<pid>" of the driver that runs the job now
CHECKPOINT = "ptv2.checkpoint."  # + checkpoint name: sha256 over every rank's marker
SWEPT = "sweep."  # + dotted spec path: the trial's value, as JSON
PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"
# The MLflow UI (3.x) opens in its GenAI view (traces, evaluation runs). Prompt tuning is model
# training: ptv2's experiments say so (the UI reads the tag when its GenAI/training switch is
# off), and ptv2's links open the training view (runs, metric charts) with `?workflowType=`.
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")
TRAINING_VIEW = "workflowType=machine_learning"
# what the worker's info tags on the run at the start (plus every auto_* value)
INFO_TAGS = ("steps", "base_weights_sha256", "trainable_params", "trainable_share_pct", "zero_stage", "dtype")
INFO_TAGS += ("device", "deepspeed_config", "gradient_checkpointing", "trainable")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def home() -> Path:
    return Path(os.environ.get("PTV2_HOME", Path.home() / ".ptv2")).expanduser().resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def ui_link(base_url: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI's training view: the experiment's runs, or one run's metrics."""
    path = "/#/"
    if experiment_id is not None:
        path += f"experiments/{experiment_id}"
        if run_id is not None:
            path += f"/runs/{run_id}/model-metrics"
    return f"{base_url.rstrip('/')}{path}?{TRAINING_VIEW}"


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


def _quoted(value: str) -> str:
    """A value for an MLflow filter string: ids only (no quote can end the literal)."""
    if not _SAFE_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not an id (letters, digits, '.', '_', '-')")
    return f"'{value}'"


class TrackingError(ValueError):
    """Something ptv2 looked for in MLflow is not there (a run, a model version, an artifact)."""


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    timestamp_ms: int = 0


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as ptv2 reads it."""

    run_id: str
    name: str
    experiment_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    start_ms: int
    end_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(repr=False)

    @classmethod
    def of(cls, run) -> RunRecord:
        return cls(
            run.info.run_id,
            run.info.run_name or "",
            run.info.experiment_id,
            run.info.status,
            run.info.start_time or 0,
            run.info.end_time,
            dict(run.data.params),
            dict(run.data.metrics),
            dict(run.data.tags),
        )

    job_id = property(lambda self: self.tags.get(JOB_ID))
    storage = property(lambda self: self.tags.get(STORAGE))
    error = property(lambda self: self.tags.get(ERROR))
    is_sweep = property(lambda self: self.tags.get(KIND) == "sweep")
    sweep_id = property(lambda self: self.tags.get(SWEEP_ID))
    trial = property(lambda self: self.tags.get(TRIAL, ""))
    early_stopped = property(lambda self: self.tags.get(EARLY_STOPPED) == "true")
    parent_run_id = property(lambda self: self.tags.get(PARENT))
    driver = property(lambda self: self.tags.get(DRIVER))
    best_run_id = property(lambda self: self.tags.get(BEST_RUN))
    sweep_objective = property(lambda self: (self.tags.get(SWEEP_METRIC), self.tags.get(SWEEP_MODE)))

    @property
    def total_steps(self) -> int | None:
        steps = self.tags.get(STEPS, "")
        return int(steps) if steps.isdigit() else None

    @property
    def trainable(self) -> tuple[int, str]:
        """(trainable values, their share of the model in %) as the worker recorded them."""
        return int(self.tags.get("ptv2.trainable_params", 0)), self.tags.get("ptv2.trainable_share_pct", "?")

    def info(self, key: str) -> str | None:
        """A value the worker recorded at the start (INFO_TAGS, auto_*)."""
        return self.tags.get(f"ptv2.{key}")

    def artifact_uri(self, kind: str) -> str | None:
        """Where the job put its `kind` ("final" or "best") prompt in storage, once written."""
        return self.tags.get(f"ptv2.{kind}_uri")

    def swept(self, path: str):
        """A trial's value of the swept spec field `path`."""
        text = self.tags.get(SWEPT + path)
        return None if text is None else json.loads(text)


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands, as its MLflow run records it."""

    run: RunRecord
    step: int
    loss: float | None
    eta_s: float | None
    eval: dict[str, float]
    eval_step: int | None

    @property
    def prompt(self) -> str | None:
        """Where its prompt is, or will be."""
        ready = self.run.artifact_uri("final")
        return ready or (self.run.storage + "/prompt" if self.run.storage else None)

    @property
    def prompt_ready(self) -> bool:
        return self.run.artifact_uri("final") is not None


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    run_id: str
    artifact: str  # path of the prompt in the run's artifacts


class Tracker:
    """One tracking store (`uri`: a SQLite file, a file store or a server) as ptv2 uses it."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_uri(uri)
        self._client = None

    def __getstate__(self) -> dict:  # pickled (Ray ships it) without its client's connections
        return {"uri": self.uri, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    # ---- experiments and runs --------------------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """Get (or create, tagged as a fine-tuning experiment) the experiment `name`; a local store
        gets an explicit artifact location (never ./mlruns)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an older ptv2, or by hand
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        if not create:
            return None
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (home() / "mlflow" / "artifacts" / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))

    def start_run(
        self,
        experiment: str,
        name: str,
        params: Mapping,
        tags: Mapping[str, str],
        spec_text: str | None = None,
    ) -> str:
        """A new RUNNING run with `params` (flattened) and `tags` (see `job_tags`, `trial_tags`)."""
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=dict(tags))
        items = [Param(k, v) for k, v in sorted(flatten(params).items())]
        for i in range(0, max(len(items), 1), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[i : i + 100], tags=[RunTag(STATUS, "running")])
        if spec_text is not None:
            self.client.log_text(run.info.run_id, spec_text, "spec.yaml")
        return run.info.run_id

    def run(self, run_id: str) -> RunRecord:
        try:
            return RunRecord.of(self.client.get_run(run_id))
        except Exception as e:
            raise TrackingError(f"run {run_id}: {first_line(e, 200)}") from e

    def runs(self, experiment: str | None = None, order_by: str | None = None, limit: int = 1000, **where) -> list:
        """Runs of `experiment` (all experiments when None), newest first or by metric `order_by`
        (highest first); `where`: job_id=, sweep_id= equal to the given id."""
        if experiment is not None:
            ids = [i for i in [self.experiment_id(experiment, create=False)] if i is not None]
        else:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        if not ids:
            return []
        tags = {"job_id": JOB_ID, "sweep_id": SWEEP_ID}
        conditions = [f"tags.`{tags[k]}` = {_quoted(v)}" for k, v in where.items()]
        order = [f"metrics.`{order_by}` DESC"] if order_by else ["attributes.start_time DESC"]
        found = self.client.search_runs(ids, " and ".join(conditions), order_by=order, max_results=limit)
        return [RunRecord.of(r) for r in found]

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def find_job_run(self, experiment: str, job_id: str) -> RunRecord | None:
        """The run of job (or sweep) `job_id`, or None."""
        found = [r for r in self.runs(experiment, job_id=job_id) if r.job_id == job_id]
        return found[0] if found else None

    def reopen(self, run_id: str, driver: str) -> None:
        """Mark a stopped or failed run as running again, by `driver` (a resumed job keeps its run)."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, STATUS, "running")
        self.client.set_tag(run_id, DRIVER, driver)
        if ERROR in self.run(run_id).tags:
            self.client.delete_tag(run_id, ERROR)

    def end(
        self, run_id: str, status: str, metrics: Mapping[str, float] | None = None, error: str | None = None
    ) -> None:
        """FINISHED, FAILED (with the one-line `error` as a tag) or KILLED (stopped)."""
        for k, v in (metrics or {}).items():
            self.client.log_metric(run_id, f"final/{k}", float(v))
        self.client.set_tag(run_id, STATUS, status.lower())
        if error:
            self.record_error(run_id, error)
        self.client.set_terminated(run_id, status=status)

    def record_error(self, run_id: str, error: str) -> None:
        """The one-line reason a run failed, without ending it (the driver ends it)."""
        self.client.set_tag(run_id, ERROR, first_line(error, 5000))

    def end_if_running(self, run_id: str, status: str, error: str | None = None) -> bool:
        """End the run unless something (the driver, a sweep's scheduler) already ended it."""
        if self.run(run_id).status != "RUNNING":
            return False
        self.end(run_id, status, error=error)
        return True

    # ---- metrics, tags and files -------------------------------------------------------------------
    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def latest_metrics(self, run_id: str, prefix: str = "") -> dict[str, float]:
        """The latest value of each metric under `prefix`, prefix removed."""
        return {k.removeprefix(prefix): v for k, v in self.run(run_id).metrics.items() if k.startswith(prefix)}

    def history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every value of metric `key`, by step."""
        points = self.client.get_metric_history(run_id, key)
        return sorted((MetricPoint(m.step, m.value, m.timestamp) for m in points), key=lambda m: m.step)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_info(self, run_id: str, info: Mapping) -> None:
        """What the worker knows at the start (INFO_TAGS and auto_*) as tags."""
        self.set_tags(run_id, {f"ptv2.{k}": v for k, v in info.items() if k in INFO_TAGS or k.startswith("auto_")})

    def mark(self, run_id: str, *, early_stopped: bool = False, sweep_best: bool = False, name: str | None = None):
        flags = {EARLY_STOPPED: early_stopped, SWEEP_BEST: sweep_best}
        self.set_tags(run_id, {k: "true" for k, on in flags.items() if on} | ({RUN_NAME: name[:250]} if name else {}))

    def log_prompt(self, run_id: str, folder, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)

    def log_dataset(self, run_id: str, frame, source: str, context: str, digest: str) -> None:
        """A data file as a dataset input of the run (named for its file, tagged with its split)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        name = Path(source.split("?", 1)[0]).name
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file either way
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:32])
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])

    def log_file(self, run_id: str, path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def record_sweep_result(self, run_id: str, metric: str, value: float, best_run_id: str, best: Mapping) -> None:
        self.client.log_metric(run_id, f"best/{metric}", value)
        self.set_tags(run_id, {BEST_RUN: best_run_id, **{f"best.{k}": v for k, v in best.items()}})

    # ---- checkpoints a resume may trust ------------------------------------------------------------
    def checkpoint_digests(self, run_id: str) -> dict[str, str]:
        """Checkpoint name -> the digest recorded when it was written."""
        return {k.removeprefix(CHECKPOINT): v for k, v in self.run(run_id).tags.items() if k.startswith(CHECKPOINT)}

    # ---- artifacts and the registry ----------------------------------------------------------------
    def artifact_files(self, run_id: str, path: str) -> list[str]:
        """Every file under artifact folder `path` of the run (recursively)."""
        out, stack = [], [path]
        try:
            while stack:
                for info in self.client.list_artifacts(run_id, stack.pop()):
                    (stack if info.is_dir else out).append(info.path)
        except Exception as e:
            raise TrackingError(f"run {run_id}: {first_line(e, 200)}") from e
        return out

    def download_artifact(self, run_id: str, name: str, dest: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, name, str(dest)))

    def model_version(self, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """The registered version `version` (or the one `alias` points at now) of prompt `name`."""
        try:
            mv = (
                self.client.get_model_version_by_alias(name, alias)
                if alias
                else self.client.get_model_version(name, version)
            )
        except Exception as e:
            raise TrackingError(first_line(e, 200)) from e
        source = re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", mv.source or "")
        if not source:
            raise TrackingError(f"its source {mv.source!r} is not a run artifact")
        return ModelVersion(name, str(mv.version), source.group(1), source.group(2))

    def register_prompt(self, run_id: str, name: str, path: str = "prompt") -> str:
        """A new version of registered prompt `name` pointing at the run's prompt artifact."""
        self.run(run_id)  # a clear error for an unknown run
        if not self.artifact_files(run_id, path):
            raise TrackingError(f"run {run_id} has no {path!r} artifact to register")
        try:
            self.client.get_registered_model(name)
        except Exception:
            self.client.create_registered_model(name, description="ptv2 prompt (P-Tuning v2 prefix + head)")
        mv = self.client.create_model_version(
            name, source=f"runs:/{run_id}/{path}", run_id=run_id, tags={"ptv2.artifact": path}
        )
        return str(mv.version)

    def record_evaluation(
        self,
        experiment: str,
        name: str,
        params: Mapping,
        metrics: Mapping[str, float],
        source_run: str | None,
        model: ModelVersion | None,
    ) -> str:
        """A finished run holding the metrics of a saved prompt on a data file (`ptv2 eval`): nested
        under the run that trained the prompt (the UI lists it there) and tagged with it and the
        registered version evaluated, which is tagged back with this run."""
        tags = {KIND: "evaluation"}
        if source_run:
            tags |= {EVALUATES: source_run, "mlflow.parentRunId": source_run}
        if model is not None:
            tags[EVALUATES_MODEL] = f"models:/{model.name}/{model.version}"
        run_id = self.start_run(experiment, name, params, tags)
        self.log_metrics(run_id, 0, metrics, "test/")
        self.client.set_terminated(run_id, "FINISHED")
        self.client.set_tag(run_id, STATUS, "finished")
        if model is not None:
            self.client.set_model_version_tag(model.name, model.version, LAST_EVALUATION, run_id)
        return run_id

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def registered_versions(self, run_id: str) -> list[str]:
        """`models:/NAME/VERSION` of every registered version made from this run's artifacts."""
        found = self.client.search_model_versions(f"run_id = {_quoted(run_id)}")
        return sorted(f"models:/{v.name}/{v.version}" for v in found)

    # ---- what status and jobs show ----------------------------------------------------------------
    def job_progress(self, experiment: str, job_id: str) -> JobProgress | None:
        """Step and total, latest loss and ETA, latest eval metrics of job `job_id`, or None."""
        run = self.find_job_run(experiment, job_id)
        if run is None:
            return None
        history, evals = self.history(run.run_id, "train/loss"), self.history(run.run_id, "eval/loss")
        return JobProgress(
            run=run,
            step=max((h.step for h in history), default=0),
            loss=run.metrics.get("train/loss"),
            eta_s=run.metrics.get("train/eta_s"),
            eval={k.removeprefix("eval/"): v for k, v in run.metrics.items() if k.startswith("eval/")},
            eval_step=max((h.step for h in evals), default=None),
        )


def job_tags(job_id: str, storage: str, versions: Mapping[str, str], **extra: str | None) -> dict[str, str]:
    """The tags a job's run starts with. `extra`: driver, ray_job_id, git_commit, and for a
    sweep's runs parent_run_id, sweep_id, trial, kind ("sweep"), sweep_metric, sweep_mode."""
    names = {
        "driver": DRIVER,
        "ray_job_id": "ray.job_id",
        "git_commit": "git.commit",
        "parent_run_id": PARENT,
        "sweep_id": SWEEP_ID,
        "trial": TRIAL,
        "kind": KIND,
        "sweep_metric": SWEEP_METRIC,
        "sweep_mode": SWEEP_MODE,
    }
    tags = {JOB_ID: job_id, STORAGE: storage, **{f"version.{k}": v for k, v in versions.items()}}
    tags.update({names[k]: v for k, v in extra.items() if v is not None})
    return tags


def swept_tags(values: Mapping) -> dict[str, str]:
    """A trial's swept values as tags (`RunRecord.swept` reads them back)."""
    return {SWEPT + k: json.dumps(v) for k, v in values.items()}
