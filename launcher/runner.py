"""Run one job on Ray: the driver (one MLflow run, a Ray Train worker group) and the worker loop
(the ptv2 DeepSpeed training loop in a process group Ray created).

`ptv2 run` calls `run_spec` with an embedded local Ray; a job submitted with `ptv2 submit` runs
`python -m launcher.entrypoint SPEC` on the cluster, which joins the cluster's Ray instead. What a
job keeps goes to its storage folder (`<storage>/<job id>/`: a shared path or an object store),
never to a node's own disk: every rank reports its checkpoint files to Ray Train, which merges
them into one checkpoint there, so a restarted worker group (FailureConfig), on any node,
resumes from it; rank 0 publishes the prompt there and logs it to MLflow, with the digest of
every checkpoint (a resume trusts only what matches). A job that stopped or failed resumes with
`--resume JOB_ID`, in the same MLflow run; one still running or already finished is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from launcher.spec import JobSpec, SpecError, check_job_id, new_job_id
from ptv2 import storage
from ptv2.callbacks import Callback, ConsoleLogger, MlflowCallback
from ptv2.checkpoint import Checkpoints
from ptv2.errors import JobError
from ptv2.settings import TrainJob
from ptv2.tracking import RunRecord, Tracker, job_tags

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


STACK = ("ptv2", "torch", "deepspeed", "transformers", "ray", "mlflow")


def stack_versions() -> dict[str, str]:
    out = {}
    for pkg in STACK:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def this_driver() -> str:
    """Who drives a job from this process: `<host/boot/PID-namespace owner>:<pid>`."""
    return f"{storage.process_owner()}:{os.getpid()}"


def driver_gone(driver: str | None) -> bool:
    """True when the driver that ran a job was a process of this host that no longer runs (the
    only case one can tell: a driver elsewhere may be alive)."""
    owner, _, pid = (driver or "").partition(":")
    return owner == storage.process_owner() and pid.isdigit() and not storage.pid_alive(int(pid))


# ---- in every Ray Train worker -------------------------------------------------------------
class RayCheckpoints(Checkpoints):
    """Checkpoints through Ray Train: each rank reports its own files and Ray merges them into
    one checkpoint folder in the job's storage (and keeps `num_to_keep` of them). A restart
    resumes from the newest checkpoint whose every rank's marker and files are there (and match
    the digest MLflow recorded): Ray registers a checkpoint only after its controller has seen
    every rank's report, which can lag a worker that dies right after its upload, while the
    markers prove the files complete."""

    def commit(self, folder: Path, name: str, rank: int) -> None:
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
            Tracker(self.uri).log_metrics(self.run_id, step, {"time/submit_to_first_step_s": seconds})


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a job receives (Ray pickles it to each)."""

    job: dict  # the TrainJob, as JSON values
    run_id: str
    tracking_uri: str
    resume: bool = False  # an explicit resume: no trusted checkpoint is an error, not a fresh start
    callbacks: tuple = ()
    report_eval: bool = False
    submitted_at: float | None = None
    trainable: object = None  # what trains besides the head (ptv2.trainee.Trainable); None: the spec's prompt


def worker_loop(config: WorkerConfig) -> None:
    """Runs in every Ray Train worker: Ray already created the process group."""
    import ray
    import ray.train

    from ptv2.train import train  # the training stack (DeepSpeed, transformers) loads in the workers only

    job = TrainJob.model_validate(config.job)
    rank = ray.train.get_context().get_world_rank()
    print(f"[ptv2] rank {rank} on node {ray.get_runtime_context().get_node_id()}", flush=True)
    callbacks = [ConsoleLogger(), MlflowCallback(config.tracking_uri, config.run_id), *config.callbacks]
    if config.submitted_at:
        callbacks.append(FirstStep(config.submitted_at, config.tracking_uri, config.run_id))
    if config.report_eval:
        callbacks.append(RayEvalReport(job.train.eval_every))
    tracker = Tracker(config.tracking_uri)
    checkpoints = RayCheckpoints(
        storage.join(job.storage, "checkpoints"),
        job.train.keep_checkpoints,
        trusted=lambda: tracker.checkpoint_digests(config.run_id),
    )
    try:
        train(job, callbacks, checkpoints, resume=config.resume, trainable=config.trainable)
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


def check_resumable(tracker: Tracker, run: RunRecord, what: str, force: bool) -> None:
    """Refuse to resume a job (or sweep) whose run is RUNNING (a second driver would train into
    the same storage and run) unless its driver was a process of this host that is gone, or
    `force`; and one that FINISHED (resuming trains again and replaces the prompt a registered
    version or a server may point at): with `force` only when no registered version does."""
    if run.status == "RUNNING" and not force and not driver_gone(run.driver):
        raise JobFailed(
            f"--resume {run.job_id}: the {what} is running (MLflow run {run.run_id} is RUNNING): a second driver "
            f"would write into the same storage and run; stop it first (ptv2 stop), or if its driver is gone "
            "for sure, pass --force"
        )
    if run.status == "FINISHED":
        registered = tracker.registered_versions(run.run_id)
        if registered:
            raise JobFailed(
                f"--resume {run.job_id}: the {what} finished and its prompt is registered ({', '.join(registered)}); "
                "resuming would train again and replace that artifact: start a new job instead"
            )
        if not force:
            raise JobFailed(
                f"--resume {run.job_id}: the {what} finished; resuming trains again and replaces its prompt "
                "artifact (pass --force to do so, e.g. after raising train.max_steps)"
            )


def reopen_run(tracker: Tracker, experiment: str, job_id: str, what: str = "job", force: bool = False) -> str:
    """--resume: the MLflow run of job (or sweep) `job_id`, checked and reopened by this driver."""
    run = tracker.find_job_run(experiment, job_id)
    if run is None:
        raise JobFailed(
            f"--resume {job_id}: no MLflow run of that {what} in experiment {experiment!r} at {tracker.uri}"
        )
    check_resumable(tracker, run, what, force)
    tracker.reopen(run.run_id, this_driver())
    return run.run_id


def open_run(spec: JobSpec, spec_text: str, job_id: str, tracker: Tracker, resume: bool, force: bool, tags) -> str:
    """The job's MLflow run: a new one, or (resume) the job's own run, reopened."""
    if resume:
        return reopen_run(tracker, spec.tracking.experiment, job_id, force=force)
    return tracker.start_run(spec.tracking.experiment, job_id, spec.model_dump(mode="json"), tags, spec_text)


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
        res = spec.resources
        if address is None:
            cpus = max(2, int(res.workers * res.cpus_per_worker))
            print(f"[ptv2] starting a local Ray ({cpus} CPUs) ...", flush=True)
            # the dashboard (bound to 127.0.0.1) serves the State API Ray Train's cleaner polls
            ray.init(
                num_cpus=cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"env_vars": worker_env(spec)},
                configure_logging=False,
            )
        else:  # a submitted job: `ptv2 submit` put worker_env() in the job's runtime env
            ray.init(address=address)
        started = True
        quiet_known_noise()
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
    resume: bool = False,
    trainable=None,
):
    """The Ray Train worker group of one job: its checkpoints and Ray's run state go to the
    job's storage; `report_eval` reports each evaluation to Ray (what Ray Tune compares);
    `trainable`: what trains besides the head (`ptv2.trainee.Trainable`; default the prompt)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = spec.resources
    fs, path = storage.resolve(spec.job_storage(job_id))
    config = WorkerConfig(
        spec.train_job(job_id).model_dump(mode="json"),
        run_id,
        uri,
        resume,
        tuple(callbacks),
        report_eval,
        submitted_at,
        trainable,
    )
    return TorchTrainer(
        worker_loop,
        train_loop_config=config,
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


def fit_job(trainer, spec: JobSpec, job_id: str, run_id: str, tracker: Tracker, owns_run: bool = True) -> dict:
    """Fit the worker group and end the job's MLflow run: FINISHED with the final eval metrics,
    FAILED with the one-line reason, KILLED when stopped. Returns the metrics.

    `owns_run=False` (a sweep's trial): an error is recorded while the run is still RUNNING but
    the run is not ended; the sweep's driver ends it (KILLED when its scheduler stopped the trial,
    which it marks before the trial's worker group goes down, FAILED otherwise)."""
    location = spec.job_storage(job_id)
    storage.delete(storage.join(location, ERROR_FILE))
    try:
        trainer.fit()
        error = _read_error(location)
        if error is not None:
            raise JobFailed(error)
        # Ray's Result.metrics is empty without a reported checkpoint: the run holds the truth
        metrics = tracker.latest_metrics(run_id, prefix="eval/")
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        if owns_run:
            tracker.end_if_running(run_id, status, error=str(e))
        elif status == "FAILED" and tracker.run(run_id).status == "RUNNING":
            tracker.record_error(run_id, str(e))
        raise
    tracker.end(run_id, "FINISHED", metrics)
    return metrics


def run_spec(
    spec: JobSpec,
    spec_text: str,
    address: str | None = None,
    job_id: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    submitted_at: float | None = None,
    force: bool = False,
    trainable=None,
) -> RunSummary:
    """Create (or reopen) the MLflow run, run the worker group on Ray, end the run.
    `address=None` starts an embedded local Ray sized for the job. `callbacks` are added to
    every worker's (they must pickle). `force`: resume a job whose run says it is running or
    finished (see `check_resumable`). `trainable`: what trains besides the head
    (`ptv2.trainee.Trainable`, the extension point; default the spec's prompt)."""
    import ray

    if resume and job_id is None:
        raise JobFailed("resume needs the id of the job to resume")
    try:
        job_id = check_job_id(job_id) if job_id is not None else new_job_id(spec.name)
    except SpecError as e:
        raise JobFailed(str(e)) from e
    location = spec.job_storage(job_id)
    if resume and not storage.exists(location):
        raise JobFailed(f"--resume {job_id}: nothing of that job in storage at {location}")
    if not resume and storage.listdir(location):
        raise JobFailed(f"storage {location} already holds a job's files: a new job needs a folder of its own")
    tracker = Tracker(spec.tracking.tracking_uri)
    tags = job_tags(
        job_id,
        location,
        stack_versions(),
        driver=this_driver(),
        ray_job_id=os.environ.get("RAY_JOB_SUBMISSION_ID", job_id) if address is not None else None,
        git_commit=_git_commit(),
    )
    run_id = open_run(spec, spec_text, job_id, tracker, resume, force, tags)
    print(f"[ptv2] job {job_id}: MLflow run {run_id} at {tracker.uri}; storage {location}", flush=True)
    started_here = False
    try:
        started_here = ensure_ray(spec, address)
        trainer = make_trainer(
            spec,
            job_id,
            run_id,
            tracker.uri,
            callbacks,
            submitted_at=submitted_at or time.time(),
            resume=resume,
            trainable=trainable,
        )
        metrics = fit_job(trainer, spec, job_id, run_id, tracker)
        if spec.tracking.register_as:
            version = tracker.register_prompt(run_id, spec.tracking.register_as)
            print(f"[ptv2] registered models:/{spec.tracking.register_as}/{version}", flush=True)
    except BaseException as e:  # failed before fitting: the run must not stay RUNNING
        tracker.end_if_running(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", error=str(e))
        raise
    finally:
        if started_here:
            ray.shutdown()
    prompt = storage.join(location, "prompt")
    n, share = tracker.run(run_id).trainable
    artifact = prompt if storage.is_file(storage.join(prompt, "manifest.json")) else None
    return RunSummary(
        job_id, run_id, location, tracker.uri, metrics, artifact, f"{n:,} parameters ({share}% of the model)"
    )
