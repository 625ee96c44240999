"""MLflow end to end against a real `mlflow server` on 127.0.0.1: a tiny job logs to it, runs
are listed, prompts fetched by run id and by registry alias verify, tampering is refused, the
REST API serves the loss curve, and the run page renders (headless Chromium, where installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from ptv2.artifact import FOLDED, RAW, sha256_file
from tests.helpers import running_mlflow_server, write_spec
from tests.tiny import write_task_data

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    with running_mlflow_server(d, d / "artifacts") as url:
        yield url, d


def _ptv2(args, cwd: Path, home: Path, timeout=600):
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PTV2_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": "/tmp/ptv2rt",
    }
    Path("/tmp/ptv2rt").mkdir(exist_ok=True)
    return subprocess.run([str(BIN / "ptv2"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    url, _ = server
    d = tmp_path_factory.mktemp("job")
    write_spec(
        d,
        "seq-cls",
        "bert",
        ["even", "odd"],
        n_dev=24,
        name="tracked",
        resources={"workers": 2},
        tracking={"experiment": "tracked", "tracking_uri": url, "register_as": "tiny-prompt"},
        data={"test_file": "test.jsonl"},
    )
    write_task_data(d / "test.jsonl", "seq-cls", n=20, seed=2)
    proc = _ptv2(["run", "job.yaml"], d, d / "home")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run id:"))
    out_dir = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("prompt:"))
    assert "registered models:/tiny-prompt/1" in proc.stdout
    assert f"runs/{run_id}/model-metrics?workflowType=machine_learning" in proc.stdout
    return d, url, run_id, Path(out_dir)


def _sums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_runs_lists_the_run_with_params_and_metrics(trained):
    d, url, run_id, _ = trained
    proc = _ptv2(["runs", "--tracking-uri", url, "--sort", "eval/accuracy"], d, d / "home")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()[:2]
    assert "eval/accuracy" in header and "eval/macro_f1" in header
    assert row.startswith(run_id) and "seq-cls" in row and "ptv2" in row


def test_fetch_by_run_id_and_by_alias_verifies_checksums(trained, tmp_path):
    d, url, run_id, trained_prompt = trained
    proc = _ptv2(["fetch", run_id, "--out", str(tmp_path / "a"), "--tracking-uri", url], d, d / "home")
    assert proc.returncode == 0, proc.stderr
    assert _sums(tmp_path / "a") == _sums(trained_prompt)
    assert (
        _ptv2(["promote", "tiny-prompt", "1", "--alias", "prod", "--tracking-uri", url], d, d / "home").returncode == 0
    )
    proc = _ptv2(
        ["fetch", "models:/tiny-prompt@prod", "--out", str(tmp_path / "b"), "--tracking-uri", url], d, d / "home"
    )
    assert proc.returncode == 0, proc.stderr
    assert _sums(tmp_path / "b") == _sums(trained_prompt)
    # a second fetch into the same folder needs --force
    again = _ptv2(["fetch", run_id, "--out", str(tmp_path / "a"), "--tracking-uri", url], d, d / "home")
    assert again.returncode == 1 and "use --force" in again.stderr


def _server_file(server_dir: Path, run_id: str, name: str) -> Path:
    return next(p for p in (server_dir / "artifacts").rglob(name) if run_id in str(p) and "/prompt/" in str(p))


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_artifact_is_refused_and_nothing_left(trained, server, tmp_path, damage):
    d, url, run_id, _ = trained
    victim = _server_file(server[1], run_id, FOLDED if damage == "tamper" else RAW)
    original = victim.read_bytes()
    try:
        if damage == "tamper":
            data = bytearray(original)
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
        else:
            victim.write_bytes(original[: len(original) // 3])
        out = tmp_path / "out"
        proc = _ptv2(["fetch", run_id, "--out", str(out), "--tracking-uri", url], d, d / "home")
        assert proc.returncode == 1
        assert "verification failed" in proc.stderr and "checksum mismatch" in proc.stderr
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []  # no temporary folder left behind
    finally:
        victim.write_bytes(original)


def test_artifact_names_escaping_the_folder_are_refused(trained, tmp_path, monkeypatch):
    from launcher import prompts

    _, url, run_id, _ = trained
    with pytest.raises(prompts.FetchError, match="escapes the output folder"):
        prompts.check_names(["prompt/manifest.json", "prompt/../../etc/cron.d/x"], "prompt")
    with pytest.raises(prompts.FetchError, match="escapes"):
        prompts.check_names(["/abs/path"], "prompt")
    from ptv2.tracking import Tracker

    monkeypatch.setattr(Tracker, "artifact_files", lambda self, r, p: ["prompt/manifest.json", "prompt/../evil"])
    with pytest.raises(prompts.FetchError, match="'prompt/../evil' escapes"):
        prompts.fetch(url, run_id, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_fetched_prompt_predicts_as_at_the_end_of_training(trained, tmp_path):
    """Predictions of the fetched prompt on the validation set reproduce the run's final
    eval accuracy, and its logits equal those of the prompt the workers wrote."""
    import mlflow
    from transformers import AutoTokenizer

    from launcher.prompts import fetch
    from ptv2.artifact import load_prompt
    from ptv2.infer import predict
    from ptv2.model import load_base_model

    d, url, run_id, trained_prompt = trained
    fetch(url, run_id, tmp_path / "p")
    tok = AutoTokenizer.from_pretrained(d / "model")
    rows = [json.loads(line) for line in (d / "dev.jsonl").read_text().splitlines()]
    fetched = load_prompt(tmp_path / "p", load_base_model(d / "model", "seq-cls", ["even", "odd"])[0])
    preds = predict(fetched, tok, [r["text"] for r in rows])
    accuracy = sum(p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)
    logged = mlflow.MlflowClient(url).get_run(run_id).data.metrics["eval/accuracy"]
    assert accuracy == pytest.approx(logged, abs=1e-9)
    original = load_prompt(trained_prompt, load_base_model(d / "model", "seq-cls", ["even", "odd"])[0])
    enc = tok([r["text"] for r in rows[:5]], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(fetched.eval()(**enc).logits, original.eval()(**enc).logits)


def test_rest_api_returns_the_loss_history(trained):
    _, url, run_id, _ = trained
    q = f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=train/loss"
    history = json.loads(urllib.request.urlopen(q, timeout=10).read())["metrics"]
    assert [m["step"] for m in sorted(history, key=lambda m: m["step"])] == list(range(1, 9))
    run = json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10).read())
    tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
    assert tags["ptv2.status"] == "finished" and tags["version.torch"] and tags["ptv2.base_weights_sha256"]
    # deepspeed.config auto (the default): a tiny model fits each worker whole; the numbers are tagged
    assert tags["ptv2.deepspeed_config"] == "replicated.json (auto)" and tags["ptv2.zero_stage"] == "0"
    assert " fits " in tags["ptv2.auto_reason"] and float(tags["ptv2.auto_frozen_gib"]) > 0
    params = {p["key"] for p in run["run"]["data"]["params"]}
    assert {"model.name_or_path", "prompt.length", "train.lr", "deepspeed.config"} <= params


def _chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--run-all-compositor-stages-before-draw",  # else the charts are still spinners
            "--virtual-time-budget=120000",  # virtual time: the page's fetches and renders settle
            "--window-size=1400,8000",  # charts render when in view: tall enough for every section
            *args,
        ],
        capture_output=True,
        timeout=120,
    )


def test_run_page_shows_the_run_and_its_metric_charts(trained, tmp_path):
    """The MLflow UI's run page, rendered by headless Chromium: its DOM names the run (header and
    title) and holds a drawn chart, with the run's series in the legend, for each metric."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it where apt is available)")
    _, url, run_id, _ = trained
    from mlflow import MlflowClient

    from ptv2.tracking import ui_link

    info = MlflowClient(url).get_run(run_id).info
    page = ui_link(url, info.experiment_id, run_id)  # the link `ptv2 run` prints
    for attempt in range(3):  # a loaded machine may cut the render short: the page, not the test, decides
        proc = _chromium(chromium, tmp_path / f"chrome{attempt}", "--dump-dom", page)
        dom = proc.stdout.decode("utf-8", errors="replace")
        if f"{info.run_name} (train/loss)" in dom and 'title="eval/macro_f1"' in dom:
            break
    assert f"<title>Run {run_id} - MLflow</title>" in dom, proc.stderr.decode()[-2000:]
    assert f'data-testid="runs-header">{info.run_name}<' in dom
    for metric in ("train/loss", "eval/accuracy", "eval/macro_f1"):
        assert f'title="{metric}"' in dom, f"no chart titled {metric}"
        assert f"{info.run_name} ({metric})" in dom, f"the {metric} chart was not drawn (no legend)"
    # the experiment, as ptv2's links open it: the training view (runs), not the GenAI overview
    exp_page = _chromium(chromium, tmp_path / "chrome-exp", "--dump-dom", ui_link(url, info.experiment_id))
    text = exp_page.stdout.decode("utf-8", errors="replace")
    assert f"<title>Runs - Experiment {info.experiment_id} - MLflow</title>" in text
    assert info.run_name in text and "matching run" in text
    assert "Token Usage" not in text and "Detect Issues" not in text  # the GenAI overview's panels
    assert MlflowClient(url).get_experiment(info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    keep = os.environ.get("PTV2_SCREENSHOT")  # a picture of the page, for the README
    if keep:
        _chromium(chromium, tmp_path / "chrome-shot", "--window-size=1400,1000", f"--screenshot={keep}", page)


def test_the_run_records_its_data_as_datasets_with_a_report(trained):
    import mlflow

    d, url, run_id, _ = trained
    client = mlflow.MlflowClient(url)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_context = {t.value: i.dataset for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert set(by_context) == {"train", "validation", "test"}
    for context, name in (("train", "train.jsonl"), ("validation", "dev.jsonl"), ("test", "test.jsonl")):
        assert by_context[context].name == name
        assert by_context[context].digest == sha256_file(d / name)[:32]
    report = json.loads(Path(client.download_artifacts(run_id, "data_report.json", str(d / "report"))).read_text())
    assert [r["rows"] for r in report] == [64, 24, 20]  # what write_spec and the test file hold


def test_eval_of_the_registered_prompt_equals_the_runs_test_metrics(trained):
    import mlflow

    d, url, run_id, _ = trained
    proc = _ptv2(["eval", "models:/tiny-prompt/1", "--data", "test.jsonl", "--tracking-uri", url], d, d / "home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "20 examples; MLflow run" in proc.stdout
    client = mlflow.MlflowClient(url)
    expected = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("test/")}
    assert set(expected) == {"test/loss", "test/accuracy", "test/macro_f1"}
    [evaluation] = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.`ptv2.evaluates` = '{run_id}'"
    )
    assert evaluation.info.run_id in proc.stdout and evaluation.info.status == "FINISHED"
    for key, value in expected.items():
        assert evaluation.data.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert evaluation.data.tags["mlflow.parentRunId"] == run_id
    assert evaluation.data.tags["ptv2.evaluates_model"] == "models:/tiny-prompt/1"
    assert client.get_model_version("tiny-prompt", "1").tags["ptv2.last_evaluation"] == evaluation.info.run_id
    [used] = evaluation.inputs.dataset_inputs
    assert used.dataset.digest == sha256_file(d / "test.jsonl")[:32]

    # a column the file lacks: named, exit 1, no run recorded
    proc = _ptv2(
        ["eval", run_id, "--data", "test.jsonl", "--column", "text=sentence", "--tracking-uri", url], d, d / "home"
    )
    assert proc.returncode == 1 and "test.jsonl: missing column(s) sentence" in proc.stderr, proc.stderr
    assert len(client.search_runs([evaluation.info.experiment_id], "tags.`ptv2.kind` = 'evaluation'")) == 1
