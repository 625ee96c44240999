"""`ptv2 predict`, `ptv2 generate` and `ptv2 export-peft` on saved prompts (tiny local models)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from ptv2.artifact import save_prompt
from ptv2.model import PromptedModel, load_base_model
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt
from tests.tiny import save_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny(d / "llama", "llama")
    save_tiny(d / "bert", "bert", "seq-cls", ["neg", "pos"])
    lm = PromptedModel(load_base_model(d / "llama", "causal-lm")[0], PromptConfig(length=3), "causal-lm")
    randomize_prompt(lm)
    save_prompt(lm, d / "lm", base_name_or_path=str(d / "llama"))
    cls = PromptedModel(load_base_model(d / "bert", "seq-cls", ["neg", "pos"])[0], PromptConfig(length=3), "seq-cls")
    save_prompt(cls, d / "cls", base_name_or_path=str(d / "bert"), labels=["neg", "pos"])
    return d


def test_generate_prints_one_json_line_per_input(prompts):
    result = runner.invoke(app, ["generate", "--prompt", str(prompts / "lm"), "--max-new-tokens", "3", "w1 w2", "w5"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["input"] for r in rows] == ["w1 w2", "w5"] and all(isinstance(r["output"], str) for r in rows)


def test_predict_reads_stdin_and_files(prompts, tmp_path):
    result = runner.invoke(app, ["predict", "--prompt", str(prompts / "cls")], input="w1 w2\nw3\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and {r["label"] for r in rows} <= {"neg", "pos"}
    f = tmp_path / "in.txt"
    f.write_text("w4 w5\n\nw6\n")
    result = runner.invoke(app, ["predict", "--prompt", str(prompts / "cls"), "--file", str(f)])
    assert result.exit_code == 0 and len([x for x in result.output.splitlines() if x.startswith("{")]) == 2


def test_predict_refuses_another_base_model(prompts):
    result = runner.invoke(app, ["predict", "--prompt", str(prompts / "cls"), "--model", str(prompts / "llama"), "w1"])
    assert result.exit_code == 1
    assert "model_type: prompt was trained with 'bert', model has 'llama'" in result.output


def test_export_peft_and_refusals(prompts, tmp_path):
    result = runner.invoke(app, ["export-peft", str(prompts / "lm"), "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    again = runner.invoke(app, ["export-peft", str(prompts / "lm"), "--out", str(tmp_path / "peft")])
    assert again.exit_code == 1 and "not empty" in again.output
    cls = runner.invoke(app, ["export-peft", str(prompts / "cls"), "--out", str(tmp_path / "x")])
    assert cls.exit_code == 1 and "causal-lm" in cls.output
    missing = runner.invoke(app, ["predict", "--prompt", str(tmp_path / "nope"), "w1"])
    assert missing.exit_code == 1 and "manifest.json is missing" in missing.output


def test_every_command_has_help():
    for cmd in (
        "validate",
        "schema",
        "run",
        "submit",
        "status",
        "logs",
        "stop",
        "jobs",
        "runs",
        "fetch",
        "register",
        "promote",
        "predict",
        "generate",
        "export-peft",
        "ui",
    ):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, cmd
