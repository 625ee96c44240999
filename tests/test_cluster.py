"""A real multi-node cluster on one machine: a Ray head that trains nothing plus worker nodes,
each its own raylet with its own scratch folder (no shared local folder for job state), an
S3-compatible object store (moto's server: a real HTTP S3 API) as the jobs' storage, and a real
`mlflow server` whose artifacts go to that store. `ptv2 submit` a 2-worker ZeRO-3 job whose
ranks land on different nodes; after its first checkpoint the node of rank 1 is killed; Ray
restarts the group on a fresh node, it resumes from the object store, the job keeps one MLflow
run, and the prompt is in the store and in MLflow, where `ptv2 fetch` verifies it.

Only what this module starts is stopped: the cluster's own processes, the two servers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3_BUCKET
from tests.helpers import free_port, running_mlflow_server, wait_for, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = S3_BUCKET


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow"), f"s3://{BUCKET}/mlflow") as url:
        yield url


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head with no CPUs (it trains nothing) and two 1-CPU worker nodes, each with its own
    scratch folder."""
    from ray.cluster_utils import Cluster

    short = Path("/tmp") / f"ptv2c{os.getpid()}"  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "PYTHONPATH", "HF_HUB_OFFLINE", "PATH")}
    # the nodes run jobs with this environment's python, as when `ray start` runs in the venv
    os.environ.update(
        RAY_TMPDIR=str(short), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PATH=f"{BIN}:{os.environ.get('PATH', '')}"
    )
    port = free_port()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            # the Jobs API goes through the head's agent: on its default port (52365) it fails to
            # bind when another Ray on this host (a user's, another test run's) already has it
            "dashboard_agent_listen_port": free_port(),
        },
    )
    scratch = tmp_path_factory.mktemp("scratch")
    nodes = {}

    def add(name: str):
        (scratch / name).mkdir()
        node = c.add_node(num_cpus=1, env_vars={"PTV2_SCRATCH": str(scratch / name)})
        nodes[node.node_id] = scratch / name
        return node

    add("node-a")
    add("node-b")
    c.wait_for_nodes()
    from ray.job_submission import JobSubmissionClient

    from launcher.jobs_client import auth_headers

    address = f"http://127.0.0.1:{port}"

    def jobs_api_up() -> bool:  # the head's job agent takes a while to register after start
        try:
            probe = JobSubmissionClient(address, headers=auth_headers()).submit_job(entrypoint="true")
        except Exception:  # not answering yet, or "No available agent"
            return False
        return bool(probe)

    _wait(jobs_api_up, 300, "the Jobs API to take jobs", step=2)
    try:
        yield c, address, add, nodes
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ptv2(args, cwd: Path, timeout=300):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PTV2_HOME": str(cwd / "home")}
    return subprocess.run([str(BIN / "ptv2"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _spec(tmp: Path, tracking_uri: str) -> Path:
    path = write_spec(
        tmp,
        name="multinode",
        model={"name_or_path": str(tmp / "model")},
        # the training file is shipped with the job; the validation file is read from the store
        data={"validation_file": f"s3://{BUCKET}/data/dev.jsonl"},
        train={"max_steps": 60, "eval_every": 20, "checkpoint_every": 4, "max_failures": 1},
        deepspeed={
            "config": "zero3.json",  # partitioned frozen weights across the nodes, whatever auto would pick
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
        storage=f"s3://{BUCKET}/jobs",
        resources={"workers": 2, "cpus_per_worker": 1},
        tracking={"experiment": "multinode", "tracking_uri": tracking_uri},
    )
    import boto3

    boto3.client("s3").upload_file(str(tmp / "dev.jsonl"), BUCKET, "data/dev.jsonl")
    return path


_wait = wait_for


def test_submit_refuses_a_cluster_python_without_ptv2(tmp_path, mlflow_server, cluster):
    """A Ray started outside ptv2's environment runs jobs with a Python that lacks it: submit
    says so in one line before sending the job (here the job's PATH leads to such a Python)."""
    _, address, _, _ = cluster
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.base_prefix + "/bin/python3")  # the Python the venv was made from
    spec = _spec(tmp_path, mlflow_server)
    proc = _ptv2(
        ["submit", str(spec), "--address", address, "--env", f"PATH={tmp_path / 'bin'}:/usr/bin:/bin"], tmp_path
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "cannot run ptv2" in proc.stderr
        and "start Ray on every node from the environment where ptv2 is installed" in proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert "multinode" not in _ptv2(["jobs", "--address", address], tmp_path).stdout  # nothing was submitted


def test_submit_refuses_what_only_one_machine_reaches(tmp_path, mlflow_server):
    spec = _spec(tmp_path, mlflow_server)
    raw = yaml.safe_load(spec.read_text())
    raw["tracking"].pop("tracking_uri")
    spec.write_text(yaml.safe_dump(raw))
    proc = _ptv2(["submit", str(spec), "--address", "http://127.0.0.1:1"], tmp_path)
    assert proc.returncode == 2 and "tracking.tracking_uri is not set" in proc.stderr
    proc = _ptv2(["submit", str(spec), "--tracking-uri", "sqlite:///x.db", "--address", "http://127.0.0.1:1"], tmp_path)
    assert proc.returncode == 2 and "tracking.tracking_uri is sqlite:///x.db" in proc.stderr
    raw["tracking"]["tracking_uri"] = mlflow_server
    raw.pop("storage")
    spec.write_text(yaml.safe_dump(raw))
    proc = _ptv2(["submit", str(spec), "--address", "http://127.0.0.1:1"], tmp_path)
    assert proc.returncode == 2 and "storage is not set" in proc.stderr


def test_a_job_survives_losing_a_node_and_resumes_from_the_object_store(tmp_path, s3, mlflow_server, cluster):
    import mlflow

    c, address, add_node, scratch = cluster
    spec = _spec(tmp_path, mlflow_server)
    proc = _ptv2(["submit", str(spec), "--address", address], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    prefix = f"jobs/{job_id}/"

    from ray.job_submission import JobSubmissionClient

    from launcher.jobs_client import auth_headers

    jobs = JobSubmissionClient(address, headers=auth_headers())  # in-process: polls must be quick
    job_logs = lambda: jobs.get_job_logs(job_id)[-6000:]  # noqa: E731

    # rank 1's node, from the job's own log; then the first checkpoint every rank reported
    def rank1_node():
        assert not jobs.get_job_status(job_id).is_terminal(), job_logs()
        found = re.search(r"\[ptv2\] rank 1 on node (\w+)", jobs.get_job_logs(job_id))
        return found.group(1) if found else None

    node_id = _wait(rank1_node, 180, "the workers to start", step=0.2, context=job_logs)

    def registered():  # Ray Train's own record of the checkpoints every rank reported
        key = prefix + "checkpoints/checkpoint_manager_snapshot.json"
        if key not in _keys(s3, key):
            return False
        return "step-0000" in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()

    _wait(registered, 180, "a registered checkpoint in the object store", step=0.2, context=job_logs)
    victim = next(n for n in c.worker_nodes if n.node_id == node_id)
    c.remove_node(victim)
    add_node("node-c")  # Ray restarts the group here: the head has no CPU for it

    _wait(lambda: jobs.get_job_status(job_id).is_terminal(), 400, "the job to end", step=2, context=job_logs)
    status = _ptv2(["status", job_id, "--address", address], tmp_path).stdout
    logs = _ptv2(["logs", job_id, "--address", address], tmp_path).stdout
    assert "SUCCEEDED" in status, status + logs[-5000:]
    resumed = re.search(r"resumed from checkpoint step-(\d+) \(step (\d+)\)", logs)
    assert resumed, logs[-5000:]
    assert "[ptv2] step 60/60 loss" in logs and "final prompt artifact (step 60)" in logs
    assert "[ptv2] eval step 60: loss" in logs  # the validation file came from the object store
    jobs_table = _ptv2(["jobs", "--address", address], tmp_path).stdout
    assert re.search(rf"{job_id}\s+SUCCEEDED\s+multinode\s+60/60", jobs_table), jobs_table

    # one MLflow run, finished, its losses from step 1 to 60; `ptv2 status` reads it
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("multinode")
    [run] = client.search_runs([exp.experiment_id])
    assert exp.tags["mlflow.experimentKind"] == "finetuning"  # the UI opens its training view
    assert run.data.metrics["time/submit_to_first_step_s"] > 0
    status = _ptv2(["status", job_id, "--address", address], tmp_path).stdout
    assert "step:     60/60 (100%), loss" in status and f"MLflow:   run {run.info.run_id} (FINISHED)" in status
    assert f"prompt:   s3://{BUCKET}/{prefix}prompt" in status and "eval:     accuracy" in status
    assert run.info.status == "FINISHED" and run.data.tags["ray.job_id"] == job_id
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 61))

    # what was written where: checkpoints (every rank's files) and the prompt in the object store,
    # MLflow's copy of the prompt in the store behind the server; nothing left on the nodes' disks
    keys = _keys(s3, prefix)
    ckpts = sorted({k.split("/")[3] for k in keys if k.startswith(prefix + "checkpoints/step-")})
    assert ckpts and all(
        {f"{prefix}checkpoints/{name}/COMPLETE-rank{r}.json" for r in (0, 1)} <= set(keys) for name in ckpts
    )
    for r in (0, 1):
        assert any(
            re.search(rf"checkpoints/{ckpts[-1]}/ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt", k) for k in keys
        )
    prompt = {k.removeprefix(prefix + "prompt/") for k in keys if k.startswith(prefix + "prompt/")}
    assert prompt == {"manifest.json", "prompt.safetensors", "trainable.safetensors"}
    assert any(k.startswith("mlflow/") and k.endswith("prompt/manifest.json") for k in _keys(s3, "mlflow/"))
    for node, folder in scratch.items():  # a killed node's process could not clean up: its disk is gone anyway
        assert node == node_id or list(folder.iterdir()) == [], f"left on a node's disk: {list(folder.iterdir())}"
    assert not (tmp_path / "home" / "runs").exists()

    # fetched through the server, verified, and the same bytes as the store's copy
    out = tmp_path / "fetched"
    proc = _ptv2(["fetch", run.info.run_id, "--out", str(out), "--tracking-uri", mlflow_server], tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("prompt.safetensors", "trainable.safetensors"):
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}prompt/{name}")["Body"].read()
        assert (out / name).read_bytes() == body
        assert manifest["files"][name]

    # scored on the cluster (a Ray job) on the validation file in the store: the run's own last evaluation
    data = f"s3://{BUCKET}/data/dev.jsonl"
    args = ["eval", run.info.run_id, "--data", data, "--address", address, "--tracking-uri", mlflow_server]
    proc = _ptv2(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [evaluated] = client.search_runs([exp.experiment_id], f"tags.`ptv2.evaluates` = '{run.info.run_id}'")
    assert evaluated.info.run_id in proc.stdout and "perplexity" in proc.stdout
    for key in ("loss", "accuracy", "perplexity"):
        assert evaluated.data.metrics[f"test/{key}"] == pytest.approx(run.data.metrics[f"eval/{key}"], rel=1e-5)


def test_a_stopped_job_resumes_in_its_own_run(tmp_path, s3, mlflow_server, cluster):
    """`ptv2 stop` ends the job and its MLflow run as KILLED; `ptv2 submit --resume JOB_ID`
    continues from the newest checkpoint in the object store, in that same run."""
    import mlflow
    from ray.job_submission import JobSubmissionClient

    from launcher.jobs_client import auth_headers

    _, address, _, _ = cluster
    spec = _spec(tmp_path, mlflow_server)
    raw = yaml.safe_load(spec.read_text())
    raw["name"], raw["tracking"]["experiment"], raw["train"]["max_steps"] = "stopped", "stopped", 150
    spec.write_text(yaml.safe_dump(raw))
    proc = _ptv2(["submit", str(spec), "--address", address], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    jobs = JobSubmissionClient(address, headers=auth_headers())
    snapshot = f"jobs/{job_id}/checkpoints/checkpoint_manager_snapshot.json"
    _wait(
        lambda: snapshot in _keys(s3, snapshot),
        240,
        "a registered checkpoint",
        context=lambda: jobs.get_job_logs(job_id)[-4000:],
    )

    proc = _ptv2(["stop", job_id, "--address", address], tmp_path)
    assert proc.returncode == 0 and f"{job_id}: stopped" in proc.stdout, proc.stderr
    client = mlflow.MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert run.info.status == "KILLED" and str(jobs.get_job_status(job_id)) in ("STOPPED", "JobStatus.STOPPED")

    proc = _ptv2(["submit", str(spec), "--address", address, "--resume", job_id], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = proc.stdout.strip().splitlines()[-1]
    assert again.startswith(f"{job_id}-resume-")
    _wait(lambda: jobs.get_job_status(again).is_terminal(), 600, "the resumed job", step=2)
    logs = jobs.get_job_logs(again)
    assert str(jobs.get_job_status(again)).endswith("SUCCEEDED"), logs[-5000:]
    assert re.search(r"resumed from checkpoint step-\d+ \(step \d+\)", logs), logs[-5000:]
    [same] = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert same.info.run_id == run.info.run_id and same.info.status == "FINISHED"
    assert "final prompt artifact (step 150)" in logs
