"""Inference with a loaded prompt: `generate` for causal LMs, `predict` for classifiers.

Inputs are tokenized without padding and padded here (`torch.nn.utils.rnn.pad_sequence`) with
the tokenizer's pad id, or its EOS where it has none (GPT-2, Llama-3, Mistral):
`tokenizer(..., padding=True)` refuses such tokenizers, and setting their pad token would change
the caller's tokenizer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from ptv2.data import collator, ensure_pad_token, load_examples
from ptv2.evaluate import evaluate
from ptv2.settings import DataSettings

ENCODED = ("input_ids", "attention_mask", "token_type_ids")


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token: inputs of different lengths cannot be padded")


def _padded(tokenizer, rows: Sequence[dict], side: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Unpadded encodings (one dict per row), padded on `side` into tensors (pads: the pad id
    in input_ids, 0 elsewhere: masked out, token type 0)."""
    out = {}
    for key in (k for k in ENCODED if k in rows[0]):
        fill = pad_id(tokenizer) if key == "input_ids" else 0
        values = [torch.tensor(row[key], dtype=torch.long) for row in rows]
        out[key] = pad_sequence(values, batch_first=True, padding_value=fill, padding_side=side).to(device)
    return out


def apply_template(template: str | None, texts: Sequence[str]) -> list[str]:
    """`texts` laid out as in training: the prompt template stored with the prompt (a loaded
    model's `prompt_template`, an artifact's `data.prompt_template`) with "{prompt}" replaced by
    each text. Without a stored template (older artifacts), the texts are returned as they are."""
    if template is None:
        return list(texts)
    return [template.replace("{prompt}", text) for text in texts]  # a plain replace: no format code runs


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    raw: bool = False,
    **gen_kwargs,
) -> list[str]:
    """Continue each prompt (greedy unless `do_sample=True` is given); returns the new text.
    Each prompt is first laid out with the template the prompt was trained with, unless `raw`.
    `model`: a PromptedModel."""
    model.eval()
    texts = list(prompts) if raw else apply_template(model.prompt_template, prompts)
    device = next(model.parameters()).device
    do_sample = gen_kwargs.pop("do_sample", False)
    outputs: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size])
        rows = [{k: enc[k][b] for k in ENCODED if k in enc} for b in range(len(enc["input_ids"]))]
        batch = _padded(tokenizer, rows, "left", device)  # continue on the right
        new = model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_id(tokenizer),
            **gen_kwargs,
        )
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


@dataclass
class _Input:
    """One input as a task's `result` reads it (what a served PredictRow holds)."""

    words: list[str] | None
    word_ids: list[int | None] | None


@torch.no_grad()
def predict(
    model,
    tokenizer,
    inputs: Sequence[str] | Sequence[Sequence[str]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict]:
    """Classify texts (seq-cls: {"label", "score", "scores"}) or tag pre-split words (token-cls:
    {"tokens", "tags", "entities"}, one tag per word from its first sub-token; a string is split on
    spaces). Inputs are truncated to `max_length` tokens, by default the training's
    data.max_length stored with the prompt (else what the model's positions leave beside the
    prompt). `model`: a PromptedModel."""
    task = model.task
    if not task.labelled:
        raise ValueError(f"predict needs a seq-cls or token-cls prompt, this one is for {task}")
    model.eval()
    id2label = model.base.config.id2label
    names = [id2label[i] for i in range(len(id2label))]
    limit = max_length or model.max_length or (model.geometry.max_positions or 512) - model.prompt_length
    device = next(model.parameters()).device
    results: list[dict] = []
    for i in range(0, len(inputs), batch_size):
        encoded, rows = [], []
        for text in inputs[i : i + batch_size]:
            source, kwargs, words = task.predict_input(text)
            enc = tokenizer(source, truncation=True, max_length=limit, **kwargs)
            encoded.append({k: enc[k][0] for k in ENCODED if k in enc})
            rows.append(_Input(words, enc.word_ids(0) if words is not None else None))
        logits = model(**_padded(tokenizer, encoded, "right", device)).logits
        results += [task.result(row, logits[b], names) for b, row in enumerate(rows)]
    return results


def score(
    model,
    tokenizer,
    path: str,
    columns: Mapping[str, str] | None = None,
    fmt: str = "auto",
    batch_size: int = 16,
) -> tuple[dict[str, float], int]:
    """(the task's metrics, examples) of a prompt on a labelled data file (a path or storage URI),
    its rows encoded as in training: the prompt's stored template and max_length. `columns`: the
    column settings of data (`text_column`, `label_column`, `prompt_column`, ...); bad rows are
    refused, each named, as training refuses them. `model`: a PromptedModel."""
    task = model.task
    stored = {"max_length": model.max_length} if model.max_length else {}
    if model.prompt_template:
        stored["prompt_template"] = model.prompt_template
    data = DataSettings(train_file=str(path), format=fmt, **dict(columns or {}), **stored)
    labels = None
    if task.labelled:
        id2label = model.base.config.id2label
        labels = [id2label[i] for i in range(len(id2label))]
    tokenizer = copy.deepcopy(tokenizer)  # padding set up for training's collators, not the caller's
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    examples = load_examples(path, data, task, labels, tokenizer)
    model.eval()
    device = next(model.parameters()).device
    metrics = evaluate(model, examples, task, labels, batch_size, collator(tokenizer, task), 0, 1, device)
    return metrics, len(examples)
