"""A client of a Ray cluster's Jobs API for ptv2 jobs: what `ptv2 submit/status/logs/stop/jobs`
do, apart from the command line.

A submitted job is its spec and local data files packaged into the job's working dir, run as
`python -m launcher.entrypoint` on the cluster with the job's environment (`runner.worker_env`;
nothing of the submitting machine's is forwarded but `--env` pairs). Before a job, a tiny probe
job checks that the cluster's Python imports ptv2 at the same versions as here. Ray 2.60's token
authentication is handled: the token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.runner import stack_versions, worker_env
from launcher.spec import JobSpec, check_job_id, load_spec, new_job_id
from ptv2 import storage
from ptv2.errors import first_line
from ptv2.tracking import JobProgress, Tracker


class ClusterError(RuntimeError):
    """The cluster cannot take or tell about the job; the message says what to fix."""


def auth_headers() -> dict[str, str]:
    """Ray 2.60 clusters use token authentication by default; the token is taken from
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (where `ray start` keeps it)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def package(spec_path: Path, out: Path, overrides: dict | None = None) -> str:
    """Copy the spec and the local data files it names into `out` (the job's working dir) and
    return the spec's name there. Data given as storage URIs and the model are read on the
    cluster. `overrides` (section -> values) are written into the shipped spec."""
    s = load_spec(spec_path, model_on_cluster=True)
    raw = yaml.safe_load(spec_path.read_text())
    (out / "data").mkdir(parents=True)
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(s.data, key)
        if value and not storage.is_uri(value):
            dest = out / "data" / f"{key}{Path(value).suffix}"
            shutil.copy2(value, dest)
            raw["data"][key] = f"data/{dest.name}"
    raw["model"]["name_or_path"] = s.model.name_or_path
    if Path(s.deepspeed.config).is_absolute():
        shutil.copy2(s.deepspeed.config, out / "deepspeed.json")
        raw.setdefault("deepspeed", {})["config"] = "deepspeed.json"
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    (out / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "spec.yaml"


def not_cluster_ready(s: JobSpec) -> str | None:
    """Why a spec would work on one machine only (a tracking store or a storage folder that the
    cluster's other nodes cannot reach), or None."""
    uri = s.tracking.tracking_uri
    if not uri or not uri.startswith(("http://", "https://", "databricks")):
        return (
            f"tracking.tracking_uri is {uri or 'not set (the local store)'}: a cluster job logs to an MLflow "
            "server every node reaches; set it in the spec or pass --tracking-uri http://HOST:5000"
        )
    if not s.storage:
        return (
            "storage is not set: a cluster job keeps checkpoints and prompts where every node reaches them; "
            "set it in the spec or pass --storage s3://BUCKET/PREFIX (or a shared path)"
        )
    return None


# Run on the cluster with the job's environment: which Python a job gets there and what it has.
PREFLIGHT = """
import importlib.metadata as md, json, sys
out = {"python": sys.executable, "versions": {}}
for name in NAMES:
    try:
        out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["versions"][name] = None
try:
    import launcher.entrypoint, ptv2.train  # noqa
except Exception as e:
    out["import_error"] = f"{type(e).__name__}: {e}"
print("PTV2-PREFLIGHT " + json.dumps(out))
"""
# Must match exactly (ray: client and cluster speak one protocol) or by major.minor.
EXACT, MINOR = ("ptv2", "ray"), ("torch", "deepspeed", "transformers", "mlflow")
FIX = "start Ray on every node from the environment where ptv2 is installed (see README, On a Ray cluster)"


@dataclass
class Submitted:
    submission_id: str  # the Ray job's id (a resume is a new Ray job of the same ptv2 job)
    job_id: str


class JobsClient:
    """The Jobs API of the Ray cluster at `address` (its dashboard's address)."""

    def __init__(self, address: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        try:
            self.api = JobSubmissionClient(address, headers=auth_headers())
        except Exception as e:  # connection refused, 401 without a token, bad URL
            raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {first_line(e)}") from e

    def check_python(self, env: dict[str, str]) -> None:
        """Refuse, in one line, a cluster whose job Python cannot run ptv2 or has other versions
        of the stack than this machine: the job would fail minutes later with a traceback."""
        code = PREFLIGHT.replace("NAMES", repr((*EXACT, *MINOR)))
        probe = self.api.submit_job(entrypoint=f"python -c {shlex.quote(code)}", runtime_env={"env_vars": env})
        try:
            for _ in range(240):
                if self.api.get_job_status(probe).is_terminal():
                    break
                time.sleep(0.5)
            logs = self.api.get_job_logs(probe)
        finally:
            with contextlib.suppress(Exception):
                self.api.delete_job(probe)
        line = next((x for x in logs.splitlines() if x.startswith("PTV2-PREFLIGHT ")), None)
        if line is None:
            last = next((x for x in reversed(logs.splitlines()) if x.strip()), "no output")
            raise ClusterError(
                f"the cluster at {self.address} could not run a Python job ({last.strip()[:200]}): {FIX}"
            )
        found = json.loads(line.removeprefix("PTV2-PREFLIGHT "))
        if found.get("import_error") or found["versions"].get("ptv2") is None:
            why = found.get("import_error") or "ptv2 is not installed"
            raise ClusterError(f"the cluster's Python ({found['python']}) cannot run ptv2 ({why[:200]}): {FIX}")
        here = stack_versions()
        for name in (*EXACT, *MINOR):
            if name not in here:
                continue
            there = found["versions"].get(name) or "none"
            same = here[name] == there if name in EXACT else here[name].split(".")[:2] == there.split(".")[:2]
            if not same:
                where = f"{name} {there} on the cluster ({found['python']}) but {here[name]} here"
                raise ClusterError(f"{where}: {FIX}, at the same versions")

    def submit(
        self,
        spec_path: Path,
        s: JobSpec,
        overrides: dict,
        env: dict[str, str],
        resume: str | None = None,
        force: bool = False,
    ) -> Submitted:
        """Package SPEC (with `overrides` written in) and submit it; a just-started head answers
        "No available agent" for a while, which is retried."""
        job_id = check_job_id(resume) if resume else new_job_id(s.name)
        submission_id = f"{job_id}-resume-{secrets.token_hex(2)}" if resume else job_id
        env = worker_env(s, env)
        with tempfile.TemporaryDirectory(prefix="ptv2-submit-") as tmp:
            name = package(spec_path, Path(tmp), overrides)
            args = [name, "--job-id", job_id, "--submitted-at", f"{time.time():.3f}"]
            args += ["--resume"] if resume else []
            args += ["--force"] if force else []
            entrypoint = shlex.join(["python", "-m", "launcher.entrypoint", *args])
            for attempt in range(12):
                try:
                    self.api.submit_job(
                        entrypoint=entrypoint,
                        submission_id=submission_id,
                        runtime_env={"working_dir": tmp, "env_vars": env},
                        metadata={
                            "ptv2": "1",
                            "name": s.name,
                            "job_id": job_id,
                            "tracking_uri": s.tracking.tracking_uri,
                            "experiment": s.tracking.experiment,
                        },
                    )
                    break
                except RuntimeError as e:
                    if "No available agent" not in str(e) or attempt == 11:
                        raise ClusterError(
                            f"the Ray Jobs API at {self.address} refused the job: {first_line(e)}"
                        ) from e
                    time.sleep(5)
        return Submitted(submission_id, job_id)

    def submit_eval(self, args: list[str], data: str, prompt: str, env: dict[str, str], gpus: float = 0) -> str:
        """Run `ptv2 eval` on the cluster: `args` are its options (--tracking-uri a server the
        cluster reaches); a local data file and a local prompt folder travel in the job's
        working dir, URIs, run ids and registered prompts are read there. Returns the Ray job id."""
        with tempfile.TemporaryDirectory(prefix="ptv2-eval-") as tmp:
            if not storage.is_uri(data):
                shutil.copy2(data, Path(tmp) / f"data{Path(data).suffix}")
                data = f"data{Path(data).suffix}"
            if Path(prompt).is_dir():
                shutil.copytree(prompt, Path(tmp) / "prompt")
                prompt = "prompt"
            entrypoint = shlex.join(["python", "-m", "launcher.cli", "eval", prompt, "--data", data, *args])
            try:
                return self.api.submit_job(
                    entrypoint=entrypoint,
                    submission_id=f"eval-{secrets.token_hex(4)}",
                    entrypoint_num_gpus=gpus or None,
                    runtime_env={"working_dir": tmp, "env_vars": env},
                    metadata={"ptv2": "eval"},
                )
            except RuntimeError as e:
                raise ClusterError(f"the Ray Jobs API at {self.address} refused the job: {first_line(e)}") from e

    def wait_result(self, submission_id: str, marker: str, timeout: float = 24 * 3600) -> str:
        """The line after `marker` that a job printed, once it ended; its log tail when it failed."""
        deadline = time.time() + timeout
        while not self.api.get_job_status(submission_id).is_terminal():
            if time.time() > deadline:
                raise ClusterError(f"job {submission_id} is still running after {timeout:.0f} s")
            time.sleep(1)
        logs = self.api.get_job_logs(submission_id)
        found = [line for line in logs.splitlines() if line.startswith(marker)]
        if self.api.get_job_status(submission_id) != "SUCCEEDED" or not found:  # a str enum
            tail = "\n".join(logs.strip().splitlines()[-15:])
            raise ClusterError(f"job {submission_id} failed on the cluster:\n{tail}")
        return found[-1].removeprefix(marker)

    def info(self, submission_id: str):
        try:
            return self.api.get_job_info(submission_id)
        except Exception as e:
            raise ClusterError(f"no job {submission_id!r} at {self.address}: {first_line(e, 200)}") from e

    def logs(self, submission_id: str) -> str:
        return self.api.get_job_logs(submission_id)

    def tail(self, submission_id: str):
        return self.api.tail_job_logs(submission_id)

    def list(self) -> list:
        return sorted(self.api.list_jobs(), key=lambda j: j.start_time or 0)

    def stop(self, submission_id: str) -> str | None:
        """Stop a job and wait (up to a minute) until it ended; its MLflow run, which the driver
        ends itself on SIGTERM, is made sure to end KILLED. Returns the run id, if any."""
        meta = self.info(submission_id).metadata or {}
        if not self.api.stop_job(submission_id):
            return None
        for _ in range(60):
            if self.api.get_job_status(submission_id).is_terminal():
                break
            time.sleep(1)
        if meta.get("tracking_uri") and meta.get("job_id"):
            tracker = Tracker(meta["tracking_uri"])
            run = tracker.find_job_run(meta.get("experiment", "ptv2"), meta["job_id"])
            if run is not None:
                tracker.end_if_running(run.run_id, "KILLED")
                return run.run_id
        return ""


def progress(meta: dict) -> JobProgress | None:
    """A job's progress from its MLflow run (the Ray job's metadata says where), or None (not a
    ptv2 job). Raises when the tracking server cannot be reached."""
    if not meta.get("tracking_uri") or not meta.get("job_id"):
        return None
    return Tracker(meta["tracking_uri"]).job_progress(meta.get("experiment", "ptv2"), meta["job_id"])
