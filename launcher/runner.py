"""Run a job spec on Ray: the driver (one MLflow run, a Ray Train worker group) and the worker
loop (the ptv2 DeepSpeed training loop in a process group Ray created).

`ptv2 run` calls `run_spec` with an embedded local Ray; a job submitted with `ptv2 submit` runs
`python -m launcher.runner SPEC` on the cluster, which joins the cluster's Ray instead. Restarted
worker groups (FailureConfig) resume from the newest complete checkpoint in the job's output
folder and keep logging to the same MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from launcher.spec import JobSpec, SpecError, load_spec
from ptv2 import tracking

# Environment the workers need: offline hubs, no telemetry, and the test-only failure switch.
PASS_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "PTV2_HOME",
    "PTV2_CACHE",
    "MLFLOW_TRACKING_URI",
    "PTV2_TEST_FAIL_AT_STEP",
    "PTV2_TEST_FAIL_RANK",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
)


@dataclass
class RunSummary:
    job_id: str
    run_id: str
    output_dir: str
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


def worker_env(spec: JobSpec) -> dict[str, str]:
    """Environment variables for the driver and workers of a job."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(spec.resources.cpus_per_worker))))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # else every worker print() appears twice
    return env


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("ptv2", "torch", "deepspeed", "transformers", "ray", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[f"version.{pkg}"] = metadata.version(pkg)
    return out


def worker_loop(config: dict) -> None:
    """Runs in every Ray Train worker: Ray already created the process group."""
    import ray.train

    from ptv2.callbacks import Callback, ConsoleLogger
    from ptv2.settings import TrainJob
    from ptv2.tracking import MlflowCallback
    from ptv2.train import train

    class RayReport(Callback):  # report to Ray at eval time only: each report blocks ~0.2-2 s
        def on_eval(self, rank, step, metrics):
            ray.train.report({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})

    job = TrainJob.model_validate(config["job"])
    callbacks = [ConsoleLogger(), MlflowCallback(config["tracking_uri"], config["run_id"])]
    if config.get("report_eval", False):
        callbacks.append(RayReport())
    train(job, callbacks)


def run_spec(spec: JobSpec, spec_text: str, address: str | None = None, job_id: str | None = None) -> RunSummary:
    """Create the MLflow run, run the worker group on Ray, end the run. `address=None` starts an
    embedded local Ray sized for the job."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job_id = job_id or new_job_id(spec.name)
    output_dir = spec.output_dir or str(tracking.home() / "runs" / job_id)
    if spec.output_dir:
        output_dir = str(Path(spec.output_dir) / job_id)
    uri = tracking.resolve_uri(spec.tracking.tracking_uri)
    tags = {"ptv2.job_id": job_id, "ptv2.output_dir": output_dir, **_versions()}
    if address is not None:
        tags["ray.job_id"] = job_id
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    run_id = tracking.start_run(uri, spec.tracking.experiment, job_id, spec.model_dump(mode="json"), tags, spec_text)
    print(f"[ptv2] job {job_id}: MLflow run {run_id} at {uri}", flush=True)
    res = spec.resources
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # report() latency 2 s -> 0.2 s
    started_here = False
    try:
        if not ray.is_initialized():
            if address is None:
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
            started_here = True
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "job": spec.train_job(output_dir).model_dump(mode="json"),
                "run_id": run_id,
                "tracking_uri": uri,
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
                name=job_id,
                storage_path=str(tracking.home() / "ray_results"),
                failure_config=FailureConfig(max_failures=spec.train.max_failures),
            ),
        )
        trainer.fit()
        # Ray's Result.metrics is empty without a reported checkpoint: the run holds the truth
        metrics = tracking.latest_metrics(uri, run_id, prefix="eval/")
        if spec.tracking.register_as:
            from launcher.prompts import register

            version = register(uri, run_id, spec.tracking.register_as)
            print(f"[ptv2] registered models:/{spec.tracking.register_as}/{version}", flush=True)
        tracking.end_run(uri, run_id, "FINISHED", metrics)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    finally:
        if started_here:
            ray.shutdown()
    artifact = Path(output_dir) / "prompt"
    tags = tracking.client(uri).get_run(run_id).data.tags
    n, share = int(tags.get("ptv2.trainable_params", 0)), tags.get("ptv2.trainable_share_pct", "?")
    trainable = f"{n:,} parameters ({share}% of the model)"
    return RunSummary(job_id, run_id, output_dir, uri, metrics, str(artifact) if artifact.is_dir() else None, trainable)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a submitted job on the cluster: `python -m launcher.runner SPEC`."""
    ap = argparse.ArgumentParser(description="Run a ptv2 job spec on the Ray cluster this process belongs to.")
    ap.add_argument("spec")
    ap.add_argument("--address", default="auto")
    ap.add_argument("--job-id", help="use this job id (ptv2 submit passes its submission id)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = run_spec(spec, Path(args.spec).read_text(), address=args.address, job_id=args.job_id)
    print(f"[ptv2] finished: run {s.run_id}, metrics {s.metrics}, prompt {s.artifact}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
