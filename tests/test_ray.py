"""`ptv2 run`'s path on an embedded local Ray: a worker dies once, Ray Train restarts the group,
it resumes from the checkpoint in the job's storage and the job keeps one MLflow run; a job
stopped half-way resumes with --resume in that same run; a bad data row stops the job at once
(no retry) with its one-line reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import FailOnce, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parent.parent


def _spec(tmp: Path, **train) -> Path:
    return write_spec(tmp, train={"checkpoint_every": 4, **train}, resources={"workers": 2})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PTV2_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray's workers unpickle the test's callback
    short = Path("/tmp") / f"ptv2r{os.getpid()}"  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_TMPDIR", str(short))
    short.mkdir(exist_ok=True)
    return tmp_path / "home"


def _runs(home: Path, experiment: str = "ptv2"):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_a_dead_worker_restarts_and_resumes_from_storage_in_one_run(tmp_path, home, capfd):
    from launcher.runner import run_spec
    from launcher.spec import load_spec

    spec = load_spec(_spec(tmp_path, max_failures=1))
    summary = run_spec(spec, "", callbacks=[FailOnce(6, 1, tmp_path / "failed-once")])
    out = capfd.readouterr().out
    assert "test failure injected: rank 1 exits at step 6" in out
    assert "resumed from checkpoint step-00000004 (step 4)" in out
    assert out.count("[ptv2] rank 0 on node") == 2  # the first worker group, and its restart
    client, runs = _runs(home)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary.run_id
    assert run.data.params["train.lr"] == "0.05" and run.data.params["model.task"] == "causal-lm"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "prompt")}
    assert {"prompt/manifest.json", "prompt/prompt.safetensors", "prompt/trainable.safetensors"} <= arts
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    job_dir = home / "runs" / summary.job_id
    assert summary.artifact == str(job_dir / "prompt") and (job_dir / "prompt" / "manifest.json").is_file()
    assert run.data.tags["ptv2.final_uri"] == str(job_dir / "prompt")
    steps = sorted(p.name for p in (job_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004"]  # 8 is the last step: the prompt, not a checkpoint, holds it
    assert {f"COMPLETE-rank{r}.json" for r in (0, 1)} <= {
        p.name for p in (job_dir / "checkpoints" / steps[0]).iterdir()
    }


def test_a_stopped_job_resumes_in_the_same_run(tmp_path, home, capfd):
    """A job killed after its step-4 checkpoint (max_failures 0: it fails) continues with
    resume from that checkpoint, in the same MLflow run, to the end."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    from launcher.runner import run_spec
    from launcher.spec import load_spec

    spec = load_spec(_spec(tmp_path, max_failures=0))
    with pytest.raises(TrainingFailedError):
        run_spec(spec, "", job_id="tiny-stopped", callbacks=[FailOnce(6, 1, tmp_path / "failed-once")])
    _, [run] = _runs(home)
    assert run.info.status == "FAILED"
    summary = run_spec(spec, "", job_id="tiny-stopped", resume=True)
    assert "resumed from checkpoint step-00000004 (step 4)" in capfd.readouterr().out
    client, runs = _runs(home)
    assert [r.info.run_id for r in runs] == [run.info.run_id] and summary.run_id == run.info.run_id
    assert runs[0].info.status == "FINISHED" and "ptv2.error" not in runs[0].data.tags
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}) == list(range(1, 9))

    # around the happy path (all refused before Ray starts): a finished job is not resumed unless
    # forced, and never once its prompt is registered, whose bytes stay as they were; a job whose
    # run is RUNNING under a live driver (this process) is not resumed: two drivers, one storage
    from launcher.prompts import fetch
    from launcher.runner import JobFailed, this_driver
    from ptv2.artifact import sha256_file
    from ptv2.tracking import Tracker

    with pytest.raises(JobFailed, match="the job finished; resuming trains again and replaces its prompt"):
        run_spec(spec, "", job_id="tiny-stopped", resume=True)
    tracker = Tracker(None)
    assert tracker.register_prompt(run.info.run_id, "stopped") == "1"
    before = fetch(None, "models:/stopped/1", tmp_path / "v1")["files"]
    with pytest.raises(JobFailed, match=r"finished and its prompt is registered \(models:/stopped/1\)"):
        run_spec(spec, "", job_id="tiny-stopped", resume=True, force=True)
    after = fetch(None, "models:/stopped/1", tmp_path / "v1-again")["files"]
    assert after == before == {f: sha256_file(tmp_path / "v1" / f) for f in before}
    tracker.reopen(run.info.run_id, this_driver())
    with pytest.raises(JobFailed, match="the job is running .* stop it first"):
        run_spec(spec, "", job_id="tiny-stopped", resume=True)
    tracker.end(run.info.run_id, "FINISHED")
    # a new job never writes into another job's folder; ids are checked before any use
    with pytest.raises(JobFailed, match="already holds a job's files"):
        run_spec(spec, "", job_id="tiny-stopped")
    with pytest.raises(JobFailed, match="job id '../x' is not valid"):
        run_spec(spec, "", job_id="../x", resume=True)


def test_a_bad_row_fails_fast_without_retries(tmp_path, home, capfd):
    from launcher.runner import JobFailed, run_spec
    from launcher.spec import load_spec

    path = _spec(tmp_path, max_failures=3)
    spec = load_spec(path)
    with open(tmp_path / "train.jsonl", "a") as f:  # after validation: only the workers can see it
        f.write('{"prompt": "w1 w2", "response": null}\n')
    with pytest.raises(JobFailed, match=rf"1 bad row\(s\): {tmp_path / 'train.jsonl'}:row 65: missing response"):
        run_spec(spec, "")
    out = capfd.readouterr()
    assert out.out.count("[ptv2] rank 0 on node") == 1  # Ray never restarted the group
    _, [run] = _runs(home)
    assert run.info.status == "FAILED" and "row 65: missing response" in run.data.tags["ptv2.error"]


def test_a_lora_baseline_trains_through_the_service_extension_point(tmp_path, home):
    """benchmarks/baselines.Lora plugs into `run_spec` (ptv2.trainee.Trainable): the same loop
    trains exactly PEFT's LoRA values, the run records them, and no prompt artifact is written."""
    from peft import LoraConfig, inject_adapter_in_model

    from benchmarks.baselines import Lora
    from launcher.runner import run_spec
    from launcher.spec import load_spec
    from tests.tiny import tiny_model

    spec = load_spec(write_spec(tmp_path, prompt={"length": 0}, train={"max_steps": 12, "lr": 1e-2, "eval_every": 6}))
    summary = run_spec(spec, "", trainable=Lora(r=2))
    client, [run] = _runs(home)
    assert run.info.status == "FINISHED" and run.info.run_id == summary.run_id
    reference = tiny_model("llama", "causal-lm", None)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), reference)
    expected = sum(p.numel() for n, p in reference.named_parameters() if "lora_" in n)
    assert run.data.tags["ptv2.trainable"] == "lora r=2"
    assert int(run.data.tags["ptv2.trainable_params"]) == expected > 0
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and min(losses[-3:]) < losses[0], losses
    assert not client.list_artifacts(run.info.run_id, "prompt")  # the base changed: not a prompt
