"""Run a job spec on Ray: the driver (one MLflow run, a Ray Train worker group) and the worker
loop (the ptv2 DeepSpeed training loop in a process group Ray created).

`ptv2 run` calls `run_spec` with an embedded local Ray; a job submitted with `ptv2 submit` runs
`python -m launcher.runner SPEC` on the cluster, which joins the cluster's Ray instead. What a
job keeps goes to its storage folder (`<storage>/<job id>/`: a shared path or an object store),
never to a node's own disk: every rank reports its checkpoint files to Ray Train, which merges
them into one checkpoint there, so a restarted worker group (FailureConfig), on any node,
resumes from it; rank 0 publishes the prompt there and logs it to MLflow. A job that stopped
or failed resumes with `--resume JOB_ID`, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from launcher.spec import JobSpec, SpecError, load_spec
from ptv2 import storage, tracking
from ptv2.callbacks import Callback
from ptv2.checkpoint import Checkpoints

ERROR_FILE = "error.json"  # where workers leave a problem no retry can fix, for the driver


class JobFailed(RuntimeError):
    """The job could not run: its one-line reason (spec field, file and row, or model)."""


class JobStopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM from `ptv2 stop` / Ray, or Ctrl-C)."""


@dataclass
class RunSummary:
    job_id: str
    run_id: str
    storage: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: str | None = None
    trainable: str = ""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


MALLOC_RETURN_BYTES = 1 << 20


def worker_env(spec: JobSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment settings of a job's driver and workers. Nothing of the submitting machine's
    environment is forwarded unless asked for (`extra`): the cluster has its own."""
    env = {
        "OMP_NUM_THREADS": str(max(1, int(spec.resources.cpus_per_worker))),
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every worker print() appears twice
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # ray.train.report() latency 2 s -> 0.2 s
        # glibc raises its mmap threshold (up to 32 MiB) whenever a large block is freed, after
        # which ZeRO-3's released gather buffers stay in its heap, resident: a fixed 1 MiB threshold
        # hands them back (3.2B model on 2 ranks: peak RSS 6.3 -> 5.3 GiB per rank, RESULTS.md)
        "MALLOC_MMAP_THRESHOLD_": str(MALLOC_RETURN_BYTES),
        "MALLOC_TRIM_THRESHOLD_": str(MALLOC_RETURN_BYTES),
    }
    if not spec.resources.gpus_per_worker:  # say it, rather than have DeepSpeed warn that it found no GPU
        env["DS_ACCELERATOR"] = "cpu"
    return {**env, **(extra or {})}


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("ptv2", "torch", "deepspeed", "transformers", "ray", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[f"version.{pkg}"] = metadata.version(pkg)
    return out


# ---- in every Ray Train worker -------------------------------------------------------------
class RayCheckpoints(Checkpoints):
    """Checkpoints through Ray Train: each rank reports its own files and Ray merges them into
    one checkpoint folder in the job's storage (and keeps `num_to_keep` of them). A restart
    resumes from the newest checkpoint whose every rank's marker and files are there: Ray
    registers a checkpoint only after its controller has seen every rank's report, which can lag
    a worker that dies right after its upload, while the markers prove the files complete."""

    def commit(self, folder: Path, name: str, metrics: dict, rank: int) -> None:
        import ray.train

        ray.train.report(
            {},  # metrics go to Ray with each evaluation (RayEvalReport), not with checkpoints
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=name,
            delete_local_checkpoint_after_upload=False,  # Checkpoints.save removes its scratch
        )

    def prune(self) -> None:  # Ray keeps CheckpointConfig(num_to_keep) of them
        pass


class RayEvalReport(Callback):
    """Each evaluation's metrics to Ray (every rank reports, as Ray requires), numbered by
    `eval_index` (from the step, so a resumed trial goes on counting where it was): what Ray
    Tune compares trials on and early-stops them by."""

    def __init__(self, eval_every: int) -> None:
        self.eval_every = eval_every

    def on_eval(self, rank, step, metrics):
        import ray.train

        index = -(-step // self.eval_every) if self.eval_every else 1
        ray.train.report({"step": step, "eval_index": index, **metrics})


class FirstStep(Callback):
    """Rank 0 says, and records in MLflow, how long the job took from submission (or `ptv2
    run`) to its first training step: Ray's start, the worker group, model loading and
    DeepSpeed's first-use builds all fall in it."""

    def __init__(self, submitted_at: float, uri: str, run_id: str) -> None:
        self.submitted_at, self.uri, self.run_id, self.done = submitted_at, uri, run_id, False

    def on_step(self, rank, step, metrics):
        if rank == 0 and not self.done:
            self.done = True
            seconds = time.time() - self.submitted_at
            print(f"[ptv2] first step {seconds:.0f} s after submission", flush=True)
            tracking.client(self.uri).log_metric(self.run_id, "time/submit_to_first_step_s", seconds, step=step)


def worker_loop(config: dict) -> None:
    """Runs in every Ray Train worker: Ray already created the process group."""
    import ray
    import ray.train

    from ptv2.callbacks import ConsoleLogger
    from ptv2.settings import TrainJob
    from ptv2.tracking import MlflowCallback
    from ptv2.train import JobError, train

    job = TrainJob.model_validate(config["job"])
    rank = ray.train.get_context().get_world_rank()
    print(f"[ptv2] rank {rank} on node {ray.get_runtime_context().get_node_id()}", flush=True)
    callbacks = [ConsoleLogger(), MlflowCallback(config["tracking_uri"], config["run_id"]), *config["callbacks"]]
    if config.get("submitted_at"):
        callbacks.append(FirstStep(config["submitted_at"], config["tracking_uri"], config["run_id"]))
    if config.get("report_eval"):
        callbacks.append(RayEvalReport(job.train.eval_every))
    checkpoints = RayCheckpoints(storage.join(job.storage, "checkpoints"), job.train.keep_checkpoints)
    try:
        train(job, callbacks, checkpoints)
    except JobError as e:  # every rank raises it; returning keeps Ray from retrying what cannot succeed
        if rank == 0:
            storage.write_bytes(storage.join(job.storage, ERROR_FILE), json.dumps({"error": str(e)}).encode())


# ---- the driver ----------------------------------------------------------------------------
def _on_sigterm(signum, frame):
    raise JobStopped(f"signal {signum}")


def _read_error(location: str) -> str | None:
    path = storage.join(location, ERROR_FILE)
    if not storage.is_file(path):
        return None
    return json.loads(storage.read_bytes(path))["error"]


def reopen_run(uri: str, experiment: str, job_id: str, what: str = "job") -> str:
    """--resume: the MLflow run of job (or sweep) `job_id`, reopened."""
    run_id = tracking.find_job_run(uri, experiment, job_id)
    if run_id is None:
        raise JobFailed(f"--resume {job_id}: no MLflow run of that {what} in experiment {experiment!r} at {uri}")
    tracking.reopen_run(uri, run_id)
    return run_id


def open_run(spec: JobSpec, spec_text: str, job_id: str, uri: str, resume: bool, tags: dict) -> str:
    """The job's MLflow run: a new one, or (resume) the job's own run, reopened."""
    if resume:
        return reopen_run(uri, spec.tracking.experiment, job_id)
    return tracking.start_run(uri, spec.tracking.experiment, job_id, spec.model_dump(mode="json"), tags, spec_text)


# Lines Ray forwards from workers that say nothing to a ptv2 user; they stay in the session's log
# files. Ray 2.60 warns at ERROR level, for each Train run, that its PreemptionWatcher actor
# has constructor arguments in the object store (ray-project/ray#53727): not an error of the job.
NOISE = (re.compile(r"Actor with class name: 'PreemptionWatcher'.*constructor arguments"),)


def quiet_known_noise() -> None:
    """Drop NOISE from the worker output this driver prints. Ray has no public hook for this:
    wrap its dispatcher's handler (Ray is pinned to 2.60.*; without the hook, nothing changes)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = dispatcher.handlers
        for i, (name, handle) in enumerate(handlers):
            if name == "ray_print_logs" and not getattr(handle, "ptv2_filtered", False):

                def filtered(data, handle=handle):
                    lines = [x for x in data.get("lines", []) if not any(p.search(x) for p in NOISE)]
                    if lines:
                        handle({**data, "lines": lines})

                filtered.ptv2_filtered = True
                handlers[i] = (name, filtered)


def ensure_ray(spec: JobSpec, address: str | None) -> bool:
    """Connect to Ray (a cluster's, or an embedded local one sized for the job when `address` is
    None); True when this call started the connection. From then on SIGTERM (`ptv2 stop`)
    raises JobStopped, so the MLflow run ends as KILLED."""
    import ray

    started, t0 = False, time.time()
    if not ray.is_initialized():
        if address is None:
            res = spec.resources
            print(
                f"[ptv2] starting a local Ray ({max(2, int(res.workers * res.cpus_per_worker))} CPUs) ...", flush=True
            )
            # the dashboard (bound to 127.0.0.1) serves the State API Ray Train's cleaner polls
            ray.init(
                num_cpus=max(2, int(res.workers * res.cpus_per_worker)),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"env_vars": worker_env(spec)},
                configure_logging=False,
            )
        else:  # a submitted job: `ptv2 submit` put worker_env() in the job's runtime env
            ray.init(address=address)
        started = True
        quiet_known_noise()
        res = spec.resources
        print(
            f"[ptv2] Ray ready in {time.time() - t0:.0f} s; starting {res.workers} worker(s) "
            "(the first run on a machine also builds DeepSpeed's CPU communication op, ~20 s)",
            flush=True,
        )
    if threading.current_thread() is threading.main_thread():
        # after ray.init, which installs its own (sys.exit)
        signal.signal(signal.SIGTERM, _on_sigterm)
    return started


def make_trainer(
    spec: JobSpec,
    job_id: str,
    run_id: str,
    uri: str,
    callbacks: Sequence[Callback] = (),
    report_eval: bool = False,
    ray_callbacks: Sequence = (),
    submitted_at: float | None = None,
):
    """The Ray Train worker group of one job: its checkpoints and Ray's run state go to the
    job's storage; `report_eval` reports each evaluation to Ray (what Ray Tune compares)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = spec.resources
    fs, path = storage.resolve(spec.job_storage(job_id))
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "job": spec.train_job(job_id).model_dump(mode="json"),
            "run_id": run_id,
            "tracking_uri": uri,
            "callbacks": list(callbacks),
            "report_eval": report_eval,
            "submitted_at": submitted_at,
        },
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": res.cpus_per_worker,
                **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name="checkpoints",  # Ray keeps its run state and the checkpoints in <job>/checkpoints
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            callbacks=list(ray_callbacks),
            # Ray Train's own INFO lines stay in the session's log files, off the console
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit_job(trainer, spec: JobSpec, job_id: str, run_id: str, uri: str) -> dict[str, float]:
    """Fit the worker group and end the job's MLflow run: FINISHED with the final eval metrics,
    FAILED with the one-line reason, KILLED when stopped. Returns the metrics."""
    location = spec.job_storage(job_id)
    storage.delete(storage.join(location, ERROR_FILE))
    try:
        trainer.fit()
        error = _read_error(location)
        if error is not None:
            raise JobFailed(error)
        # Ray's Result.metrics is empty without a reported checkpoint: the run holds the truth
        metrics = tracking.latest_metrics(uri, run_id, prefix="eval/")
    except BaseException as e:
        tracking.end_run(uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", error=str(e))
        raise
    tracking.end_run(uri, run_id, "FINISHED", metrics)
    return metrics


def job_tags(job_id: str, location: str, address: str | None) -> dict[str, str]:
    tags = {"ptv2.job_id": job_id, "ptv2.storage": location, **_versions()}
    if address is not None:
        tags["ray.job_id"] = os.environ.get("RAY_JOB_SUBMISSION_ID", job_id)
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    return tags


def run_spec(
    spec: JobSpec,
    spec_text: str,
    address: str | None = None,
    job_id: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    submitted_at: float | None = None,
) -> RunSummary:
    """Create (or reopen) the MLflow run, run the worker group on Ray, end the run.
    `address=None` starts an embedded local Ray sized for the job. `callbacks` are added to
    every worker's (they must pickle)."""
    import ray

    if resume and job_id is None:
        raise JobFailed("resume needs the id of the job to resume")
    job_id = job_id or new_job_id(spec.name)
    location = spec.job_storage(job_id)
    if resume and not storage.exists(location):
        raise JobFailed(f"--resume {job_id}: nothing of that job in storage at {location}")
    uri = tracking.resolve_uri(spec.tracking.tracking_uri)
    run_id = open_run(spec, spec_text, job_id, uri, resume, job_tags(job_id, location, address))
    print(f"[ptv2] job {job_id}: MLflow run {run_id} at {uri}; storage {location}", flush=True)
    started_here = False
    try:
        started_here = ensure_ray(spec, address)
        trainer = make_trainer(spec, job_id, run_id, uri, callbacks, submitted_at=submitted_at or time.time())
        metrics = fit_job(trainer, spec, job_id, run_id, uri)
        if spec.tracking.register_as:
            from launcher.prompts import register

            version = register(uri, run_id, spec.tracking.register_as)
            print(f"[ptv2] registered models:/{spec.tracking.register_as}/{version}", flush=True)
    except BaseException as e:
        if tracking.client(uri).get_run(run_id).info.status == "RUNNING":  # failed before fitting
            tracking.end_run(uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", error=str(e))
        raise
    finally:
        if started_here:
            ray.shutdown()
    prompt = storage.join(location, "prompt")
    tags = tracking.client(uri).get_run(run_id).data.tags
    n, share = int(tags.get("ptv2.trainable_params", 0)), tags.get("ptv2.trainable_share_pct", "?")
    trainable = f"{n:,} parameters ({share}% of the model)"
    artifact = prompt if storage.is_file(storage.join(prompt, "manifest.json")) else None
    return RunSummary(job_id, run_id, location, uri, metrics, artifact, trainable)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a submitted job on the cluster: `python -m launcher.runner SPEC`."""
    ap = argparse.ArgumentParser(description="Run a ptv2 job spec on the Ray cluster this process belongs to.")
    ap.add_argument("spec")
    ap.add_argument("--address", default="auto")
    ap.add_argument("--job-id", help="use this job id (ptv2 submit passes its own)")
    ap.add_argument("--resume", action="store_true", help="continue job --job-id from its newest checkpoint")
    ap.add_argument("--submitted-at", type=float, help="when `ptv2 submit` sent the job (seconds since the epoch)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        text = Path(args.spec).read_text()
        if spec.sweep is not None:  # a sweep submitted to the cluster
            from launcher.sweep import run_sweep

            s = run_sweep(spec, text, address=args.address, sweep_id=args.job_id, resume=args.resume)
            print(f"[ptv2] sweep finished: best run {s.best_run_id}, {s.metric} {s.best_value:.4f}", flush=True)
            return 0
        s = run_spec(
            spec, text, address=args.address, job_id=args.job_id, resume=args.resume, submitted_at=args.submitted_at
        )
    except (SpecError, JobFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except JobStopped:
        print("[ptv2] stopped", flush=True)
        return 130
    print(f"[ptv2] finished: run {s.run_id}, metrics {s.metrics}, prompt {s.artifact}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
