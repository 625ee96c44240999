"""Sweeps on Ray Tune, compared in MLflow: bad sweep sections are refused before anything runs;
a real sweep on a tiny model nests one MLflow run per trial under the sweep's run, ASHA stops
the trial that falls behind, the best trial is tagged and registered; a sweep whose driver is
killed resumes without running its finished trials again, and a failing trial fails alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_spec

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _spec(tmp: Path, sweep: dict, **train) -> Path:
    return write_spec(
        tmp,
        n_train=48,
        filename="sweep.yaml",
        train={"log_every": 4, "eval_every": 2, **train},
        resources={"workers": 2},
        tracking={"experiment": "sweeps"},
        sweep=sweep,
    )


@pytest.mark.parametrize(
    "sweep,train,message",
    [
        (
            {"parameters": {"train.lrr": {"grid": [0.1]}}},
            {},
            r"sweep.parameters.train.lrr: no such field \(train has: .*lr,",
        ),
        ({"parameters": {"prompt": {"grid": [1]}}}, {}, "sweep.parameters.prompt: .*whole section"),
        ({"parameters": {"name": {"grid": ["x"]}}}, {}, "sweep.parameters.name: name cannot be swept"),
        (
            {"parameters": {"train.lr": {"grid": [0.1, -1]}}},
            {},
            r"sweep.parameters.train.lr: value -1 is not valid there: train.lr",
        ),
        ({"parameters": {"prompt.length": {"integer": [4, 99999]}}}, {}, "sweep.parameters.prompt.length: value 99999"),
        ({"parameters": {"train.lr": {"loguniform": [0, 1]}}}, {}, "loguniform needs low > 0"),
        ({"parameters": {"train.lr": {"grid": [1], "choice": [2]}}}, {}, "exactly one of grid, choice"),
        ({"parameters": {"train.lr": {"uniform": [0.1, 0.01]}}}, {}, "needs low < high"),
        (
            {"parameters": {"train.lr": {"grid": [0.1]}}, "metric": "accuracyy"},
            {},
            "sweep.metric: 'accuracyy' is not an eval metric of causal-lm",
        ),
        ({"parameters": {"train.lr": {"grid": [0.1]}}}, {"eval_every": 0}, "train.eval_every: early stopping compares"),
        ({"parameters": {}}, {}, "sweep.parameters"),
        ({"parameters": {"train.lr": {"grid": [0.1]}}, "sampels": 2}, {}, "sweep.sampels: unknown key"),
    ],
)
def test_bad_sweep_sections_are_refused_naming_the_field(tmp_path, sweep, train, message):
    from launcher.spec import SpecError, load_spec

    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, sweep, **train))


def test_a_sweep_needs_validation_data_and_run_refuses_a_sweep_spec(tmp_path):
    from launcher.spec import SpecError, load_spec

    path = _spec(tmp_path, {"parameters": {"train.lr": {"grid": [0.1]}}})
    raw = yaml.safe_load(path.read_text())
    raw["data"].pop("validation_file")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="data.validation_file: a sweep compares trials on validation data"):
        load_spec(path)
    path = _spec(tmp_path, {"parameters": {"train.lr": {"grid": [0.1]}}})
    proc = subprocess.run([str(BIN / "ptv2"), "run", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has a sweep: section: run it with `ptv2 sweep" in proc.stderr


def _env(tmp: Path) -> dict:
    short = Path("/tmp") / f"ptv2w{os.getpid()}"  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PTV2_HOME": str(tmp / "home"),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(short),
    }


def _client(tmp: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp / 'home' / 'mlflow' / 'mlflow.db'}")


def _runs(tmp: Path):
    c = _client(tmp)
    exp = c.get_experiment_by_name("sweeps")
    return c.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
@pytest.mark.dist
def test_a_sweep_nests_its_trials_stops_the_worse_one_and_registers_the_best(tmp_path):
    sweep = {
        "parameters": {"train.lr": {"grid": [0.1, 1.0e-6]}},  # Tune runs a grid in order
        "early_stopping": {"grace_period": 1, "reduction_factor": 2},
    }
    path = _spec(tmp_path, sweep)
    raw = yaml.safe_load(path.read_text())
    raw["tracking"]["register_as"] = "tiny-best"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [str(BIN / "ptv2"), "sweep", str(path)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    runs = _runs(tmp_path)
    [parent] = [r for r in runs if r.data.tags.get("ptv2.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    by_lr = {json.loads(r.data.tags["sweep.train.lr"]): r for r in children}
    good, bad = by_lr[0.1], by_lr[1.0e-6]
    assert good.info.status == "FINISHED" and good.data.params["train.lr"] == "0.1"
    assert bad.info.status == "KILLED" and bad.data.tags["ptv2.early_stopped"] == "true"
    c = _client(tmp_path)
    assert (
        len(c.get_metric_history(bad.info.run_id, "eval/loss"))
        < 4
        == len(c.get_metric_history(good.info.run_id, "eval/loss"))
    )
    assert parent.info.status == "FINISHED" and parent.data.tags["ptv2.best_run_id"] == good.info.run_id
    assert good.data.tags["ptv2.sweep_best"] == "true"
    assert parent.data.metrics["best/loss"] == pytest.approx(
        min(m.value for m in c.get_metric_history(good.info.run_id, "eval/loss"))
    )
    assert parent.data.params["sweep.parameters.train.lr"] == "grid [0.1, 1e-06]"
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "sweep")}
    assert arts == {"sweep/trials.csv", "sweep/trials.md", "sweep/metric_by_parameter.png"}
    version = c.get_model_version("tiny-best", "1")
    assert version.run_id == good.info.run_id and version.source.endswith("/best")
    table = subprocess.run(
        [str(BIN / "ptv2"), "runs", "--sweep", parent.data.tags["ptv2.sweep_id"]],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.splitlines()
    assert table[0].split()[:5] == ["run_id", "trial", "status", "evaluations", "loss"]
    assert table[1].startswith(good.info.run_id) and "FINISHED" in table[1]
    assert table[2].startswith(bad.info.run_id) and "STOPPED EARLY" in table[2]


@pytest.mark.slow
@pytest.mark.dist
def test_a_killed_sweep_resumes_and_a_failing_trial_fails_alone(tmp_path):
    """The driver is killed after the first trial finished; --resume runs the rest (the second
    fails: its prompt leaves the tiny model too few positions) and keeps the first as it was."""
    sweep = {"parameters": {"prompt.length": {"grid": [4, 120, 6]}}, "early_stopping": None}
    path = _spec(tmp_path, sweep, max_steps=4)
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "ptv2"), "sweep", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [r for r in _runs(tmp_path) if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
        if done:
            break
        assert proc.poll() is None, proc.communicate()[0][-5000:]  # the sweep ended before any trial finished
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, as a lost head would
    proc.wait(timeout=60)
    [first] = done
    [parent] = [r for r in _runs(tmp_path) if r.data.tags.get("ptv2.kind") == "sweep"]
    sweep_id = parent.data.tags["ptv2.sweep_id"]
    resumed = subprocess.run(
        [str(BIN / "ptv2"), "sweep", str(path), "--resume", sweep_id],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    runs = _runs(tmp_path)
    children = {json.loads(r.data.tags["sweep.prompt.length"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == [4, 6, 120] and len(runs) == 4
    assert children[4].info.run_id == first.info.run_id and children[4].info.end_time == first.info.end_time
    assert children[4].info.status == children[6].info.status == "FINISHED"
    assert children[120].info.status == "FAILED"
    assert (
        "120 prompt positions + data.max_length 32 = 152 exceed the 128 positions"
        in children[120].data.tags["ptv2.error"]
    )
    [parent] = [r for r in runs if r.data.tags.get("ptv2.kind") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["ptv2.best_run_id"] in {
        children[4].info.run_id,
        children[6].info.run_id,
    }
