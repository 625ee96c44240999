"""End to end through Ray: `ptv2 run` on an embedded local Ray, fault injection with one
restart, and `ptv2 submit` to a real Ray head started on 127.0.0.1 by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import save_tiny, write_task_data

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _spec(tmp: Path, **train) -> Path:
    save_tiny(tmp / "model", "llama", "causal-lm")
    write_task_data(tmp / "train.jsonl", "causal-lm", n=64)
    write_task_data(tmp / "dev.jsonl", "causal-lm", n=16, seed=1)
    spec = {
        "name": "tiny",
        "model": {"name_or_path": "model", "task": "causal-lm"},
        "prompt": {"length": 4},
        "data": {"train_file": "train.jsonl", "validation_file": "dev.jsonl", "max_length": 32},
        "train": {
            "max_steps": 8,
            "lr": 0.05,
            "micro_batch_size": 8,
            "log_every": 1,
            "eval_every": 4,
            "checkpoint_every": 4,
            **train,
        },
        "resources": {"workers": 2},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(tmp: Path, **extra) -> dict:
    # PATH as with an activated venv: the cluster runs the job's `python` from it
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PTV2_HOME": str(tmp / "home"),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": _ray_tmp(tmp),
        **extra,
    }


def _ray_tmp(tmp: Path) -> str:
    """Ray's socket paths must stay under 107 characters: a short folder in /tmp per test."""
    d = Path("/tmp") / f"ptv2r{abs(hash(str(tmp))) % 10**8}"
    d.mkdir(exist_ok=True)
    return str(d)


def _ptv2(args, tmp: Path, timeout=600, **env):
    return subprocess.run(
        [str(BIN / "ptv2"), *args], cwd=tmp, env=_env(tmp, **env), capture_output=True, text=True, timeout=timeout
    )


def _runs(tmp: Path, experiment: str = "ptv2"):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'home' / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_ptv2_run_on_local_ray_with_one_worker_failure(tmp_path):
    """A worker dies once at step 6; the group restarts, resumes from the step-4 checkpoint, the
    job succeeds, and there is exactly one MLflow run with the prompt artifact."""
    spec = _spec(tmp_path, max_failures=1)
    proc = _ptv2(["run", str(spec)], tmp_path, PTV2_TEST_FAIL_AT_STEP="6")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "test failure injected: rank 1 exits at step 6" in out
    assert "resumed from checkpoint step-00000004 (step 4)" in out
    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["model.task"] == "causal-lm"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "prompt")}
    assert {"prompt/manifest.json", "prompt/prompt.safetensors", "prompt/trainable.safetensors"} <= arts
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    assert f"run id:    {run.info.run_id}" in proc.stdout


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 (token auth as Ray 2.60 defaults), stopped afterwards."""
    env = _env(tmp_path)
    port = 8265 + (os.getpid() % 200)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(port),
        "--port",
        str(6379 + os.getpid() % 200),
        "--disable-usage-stats",
        "--temp-dir",
        _ray_tmp(tmp_path),
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(_ray_tmp(tmp_path), ignore_errors=True)


def test_submit_status_logs_to_a_ray_cluster(tmp_path, ray_head):
    spec = _spec(tmp_path)
    proc = _ptv2(["submit", str(spec), "--address", ray_head], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("tiny-")
    deadline = time.time() + 400
    status = ""
    while time.time() < deadline:
        status = _ptv2(["status", job_id, "--address", ray_head], tmp_path).stdout
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = _ptv2(["logs", job_id, "--address", ray_head], tmp_path).stdout
    assert "SUCCEEDED" in status, status + logs[-4000:]
    assert "[ptv2] step 8/8 loss" in logs and "final prompt artifact" in logs
    assert job_id in _ptv2(["jobs", "--address", ray_head], tmp_path).stdout
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["ray.job_id"] == job_id
    assert (tmp_path / "home" / "runs" / job_id / "prompt" / "manifest.json").is_file()
    assert _ptv2(["status", "no-such-job", "--address", ray_head], tmp_path).returncode == 1
