"""MLflow tracking: the only module of ptv2 that imports MLflow.

The driver owns the run (creates it, ends it); rank 0 of the workers attaches to it by id and
logs step and eval metrics and the prompt artifacts through the training loop's callbacks. The
embedded default store is SQLite plus an artifact folder under $PTV2_HOME (default ~/.ptv2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from ptv2.callbacks import Callback
from ptv2.errors import first_line

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def home() -> Path:
    return Path(os.environ.get("PTV2_HOME", Path.home() / ".ptv2")).expanduser().resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def client(uri: str | None = None):
    from mlflow import MlflowClient

    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


# The MLflow UI (3.x) opens in its GenAI view (traces, evaluation runs). Prompt tuning is model
# training: ptv2's experiments say so (the UI reads the tag when its GenAI/training switch is
# off), and ptv2's links open the training view (runs, metric charts) with `?workflowType=`.
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")
TRAINING_VIEW = "workflowType=machine_learning"


def ui_link(base_url: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI's training view: the experiment's runs, or one run's metrics."""
    path = "/#/"
    if experiment_id is not None:
        path += f"experiments/{experiment_id}"
        if run_id is not None:
            path += f"/runs/{run_id}/model-metrics"
    return f"{base_url.rstrip('/')}{path}?{TRAINING_VIEW}"


def experiment_id(c, name: str) -> str:
    """Get or create, tagged as a fine-tuning experiment; a local store gets an explicit
    artifact location (never ./mlruns)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an older ptv2, or by hand
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:///"):
        location = (home() / "mlflow" / "artifacts" / name).as_uri()
    return c.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


def start_run(
    uri: str | None,
    experiment: str,
    run_name: str,
    params: Mapping,
    tags: Mapping[str, str],
    spec_text: str | None = None,
) -> str:
    from mlflow.entities import Param, RunTag

    c = client(uri)
    run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=dict(tags))
    items = [Param(k, v) for k, v in sorted(flatten(params).items())]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i : i + 100], tags=[RunTag("ptv2.status", "running")])
    if spec_text is not None:
        c.log_text(run.info.run_id, spec_text, "spec.yaml")
    return run.info.run_id


def latest_metrics(uri: str | None, run_id: str, prefix: str = "") -> dict[str, float]:
    """The latest value of each metric under `prefix`, prefix removed."""
    data = client(uri).get_run(run_id).data.metrics
    return {k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)}


def find_job_run(uri: str | None, experiment: str, job_id: str) -> str | None:
    """The MLflow run of job `job_id` (tag ptv2.job_id), or None."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ptv2.job_id` = '{job_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def job_progress(uri: str | None, experiment: str, job_id: str) -> dict | None:
    """Where job `job_id` stands, as its MLflow run records it: run id and status, step and
    total, latest loss and ETA, the latest eval metrics, where its prompt is (or will be)."""
    run_id = find_job_run(uri, experiment, job_id)
    if run_id is None:
        return None
    c = client(uri)
    run = c.get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    history = c.get_metric_history(run_id, "train/loss")
    evals = c.get_metric_history(run_id, "eval/loss")
    return {
        "run_id": run_id,
        "status": run.info.status,
        "step": max((h.step for h in history), default=0),
        "total": int(tags["ptv2.steps"]) if tags.get("ptv2.steps", "").isdigit() else None,
        "loss": m.get("train/loss"),
        "eta_s": m.get("train/eta_s"),
        "eval": {k.removeprefix("eval/"): v for k, v in m.items() if k.startswith("eval/")},
        "eval_step": max((h.step for h in evals), default=None),
        "prompt": tags.get("ptv2.final_uri") or (tags["ptv2.storage"] + "/prompt" if "ptv2.storage" in tags else None),
        "prompt_ready": "ptv2.final_uri" in tags,
        "error": tags.get("ptv2.error"),
    }


def reopen_run(uri: str | None, run_id: str) -> None:
    """Mark a stopped or failed run as running again (a resumed job keeps its run)."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "ptv2.status", "running")
    if "ptv2.error" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, "ptv2.error")


def end_run(
    uri: str | None, run_id: str, status: str, metrics: Mapping[str, float] | None = None, error: str | None = None
) -> None:
    """FINISHED, FAILED (with the one-line `error` as a tag) or KILLED (stopped)."""
    c = client(uri)
    for k, v in (metrics or {}).items():
        c.log_metric(run_id, f"final/{k}", float(v))
    c.set_tag(run_id, "ptv2.status", status.lower())
    if error:
        c.set_tag(run_id, "ptv2.error", first_line(error, 5000))
    c.set_terminated(run_id, status=status)


class MlflowCallback(Callback):
    """Rank 0 logs step and eval metrics and the prompt artifacts to the driver's run."""

    def __init__(self, uri: str | None, run_id: str) -> None:
        self.uri, self.run_id = resolve_uri(uri), run_id
        self._client = None

    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _log(self, step: int, metrics: Mapping[str, float], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items() if k != "total_steps"]
        self.c.log_batch(self.run_id, metrics=batch)

    def on_train_start(self, rank, info):
        if rank == 0:
            for key in (
                "steps",
                "base_weights_sha256",
                "trainable_params",
                "trainable_share_pct",
                "zero_stage",
                "dtype",
                "device",
                "deepspeed_config",
                "gradient_checkpointing",
            ):
                if key in info:
                    self.c.set_tag(self.run_id, f"ptv2.{key}", str(info[key]))
            for key, value in info.items():  # why `deepspeed.config: auto` chose its file, and the numbers
                if key.startswith("auto_"):
                    self.c.set_tag(self.run_id, f"ptv2.{key}", str(value))

    def on_train_end(self, rank, summary):
        if rank == 0 and summary.get("resources"):
            self._log(summary["steps"], summary["resources"], "")

    def on_step(self, rank, step, metrics):
        if rank == 0:
            self._log(step, metrics, "train/")

    def on_eval(self, rank, step, metrics):
        if rank == 0:
            self._log(step, metrics, "eval/")

    def on_test(self, rank, step, metrics):
        if rank == 0:
            self._log(step, metrics, "test/")

    def on_artifact(self, rank, step, path, kind, location):
        if rank == 0:
            self.c.log_artifacts(self.run_id, str(path), artifact_path="prompt" if kind == "final" else kind)
            self.c.set_tag(self.run_id, f"ptv2.{kind}_step", str(step))
            self.c.set_tag(self.run_id, f"ptv2.{kind}_uri", location)

    def on_checkpoint(self, rank, step, location):
        if rank == 0:
            self.c.set_tag(self.run_id, "ptv2.last_checkpoint", f"{step}: {location}")
