"""Tiny checkpoints and prompts for the serving tests (tests/test_serving.py, tests/test_serve.py).

A base is saved the way real checkpoints come (decoders with their LM head, encoders as the bare
body with BERT's pooler); prompts are trained-looking artifacts made on the task class each task
loads from that checkpoint, so every head is "new" and carried by the prompt, as in a real run."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel

from ptv2.artifact import load_prompt, save_prompt
from ptv2.model import PromptedModel, load_base_model
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt
from tests.tiny import tiny_config, tiny_model, tiny_tokenizer

LABELS = {"seq-cls": ["neg", "neu", "pos"], "token-cls": ["O", "B-x", "I-x"]}


def save_base(path: Path, arch: str, seed: int = 0) -> Path:
    if arch in ("bert", "roberta"):
        torch.manual_seed(seed)
        config = tiny_config(arch)
        if arch == "roberta":
            config.pad_token_id = 0
        AutoModel.from_config(config).save_pretrained(path)
    else:
        tiny_model(arch, "causal-lm", seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_prompt(
    out: Path,
    base_dir: Path,
    task: str,
    method: str = "ptv2",
    length: int = 4,
    seed: int = 0,
    template: str | None = None,
    max_length: int | None = None,
) -> Path:
    """A prompt artifact with random (seeded) prompt values and head for `task` on `base_dir`."""
    labels = LABELS.get(task)
    torch.manual_seed(seed + 1000)  # the task head: new at load, so drawn here
    base, _ = load_base_model(base_dir, task, labels)
    model = PromptedModel(base, PromptConfig(method=method, length=length, init="normal"), task)
    if model.prompt.length:
        randomize_prompt(model, seed=seed, scale=0.5)
    return save_prompt(
        model, out, base_name_or_path=str(base_dir), labels=labels, template=template, max_length=max_length
    )


def alone(path: Path, base_dir: Path) -> PromptedModel:
    """The prompt on its own copy of the base: what `ptv2 predict`/`generate` run."""
    from ptv2.artifact import read_manifest

    manifest = read_manifest(path)
    base, _ = load_base_model(base_dir, manifest["task"], manifest.get("labels"))
    return load_prompt(path, base).eval()
