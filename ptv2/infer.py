"""Inference with a loaded prompt: `generate` for causal LMs, `predict` for classifiers.

Inputs are tokenized without padding and padded here (`torch.nn.utils.rnn.pad_sequence`) with
the tokenizer's pad id, or its EOS where it has none (GPT-2, Llama-3, Mistral):
`tokenizer(..., padding=True)` refuses such tokenizers, and setting their pad token would change
the caller's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ptv2.model import PromptedModel

ENCODED = ("input_ids", "attention_mask", "token_type_ids")


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token: inputs of different lengths cannot be padded")


def _padded(tokenizer, enc, side: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The rows of an unpadded batch encoding, padded on `side` into tensors (pads: the pad id
    in input_ids, 0 elsewhere: masked out, token type 0)."""
    out = {}
    for key in (k for k in ENCODED if k in enc):
        fill = _pad_id(tokenizer) if key == "input_ids" else 0
        rows = [torch.tensor(row, dtype=torch.long) for row in enc[key]]
        out[key] = pad_sequence(rows, batch_first=True, padding_value=fill, padding_side=side).to(device)
    return out


def apply_template(source: PromptedModel | dict | str | None, texts: Sequence[str]) -> list[str]:
    """`texts` laid out as in training: the prompt template stored with the prompt (a loaded
    model, an artifact manifest, or the template itself) with "{prompt}" replaced by each text.
    Without a stored template (older artifacts), the texts are returned as they are."""
    if isinstance(source, PromptedModel):
        template = source.prompt_template
    elif isinstance(source, dict):
        template = (source.get("data") or {}).get("prompt_template")
    else:
        template = source
    if template is None:
        return list(texts)
    return [template.replace("{prompt}", text) for text in texts]  # a plain replace: no format code runs


@torch.no_grad()
def generate(
    model: PromptedModel,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    raw: bool = False,
    **gen_kwargs,
) -> list[str]:
    """Continue each prompt (greedy unless `do_sample=True` is given); returns the new text.
    Each prompt is first laid out with the template the prompt was trained with, unless `raw`."""
    model.eval()
    pad = _pad_id(tokenizer)
    texts = list(prompts) if raw else apply_template(model, prompts)
    device = next(model.parameters()).device
    do_sample = gen_kwargs.pop("do_sample", False)
    outputs: list[str] = []
    for i in range(0, len(texts), batch_size):
        batch = _padded(tokenizer, tokenizer(texts[i : i + batch_size]), "left", device)  # continue on the right
        new = model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad,
            **gen_kwargs,
        )
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def label_scores(probs: torch.Tensor, names: Sequence[str]) -> dict:
    """A seq-cls result from one row of class probabilities: the best label, its score, all scores."""
    best = int(probs.argmax())
    return {"label": names[best], "score": float(probs[best]), "scores": dict(zip(names, probs.tolist(), strict=True))}


def word_tags(word_ids: Sequence[int | None], best: Sequence[int], names: Sequence[str], n_words: int) -> list[str]:
    """One tag per word, from the predicted class (`best`, per sub-token) of its first sub-token."""
    tags = ["O"] * n_words
    seen = set()
    for t, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            tags[w] = names[int(best[t])]
    return tags


def _labels(model: PromptedModel) -> list[str]:
    id2label = model.base.config.id2label
    return [id2label[i] for i in range(len(id2label))]


@torch.no_grad()
def predict(
    model: PromptedModel,
    tokenizer,
    inputs: Sequence[str] | Sequence[Sequence[str]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict]:
    """Classify texts (seq-cls: {"label", "score", "scores"}) or tag pre-split words (token-cls:
    {"tokens", "tags"}, one tag per word from its first sub-token; a string is split on spaces).
    Inputs are truncated to `max_length` tokens, by default the training's data.max_length
    stored with the prompt (else what the model's positions leave beside the prompt)."""
    if model.task not in ("seq-cls", "token-cls"):
        raise ValueError(f"predict needs a seq-cls or token-cls prompt, this one is for {model.task}")
    model.eval()
    names = _labels(model)
    limit = max_length or model.max_length or (model.geometry.max_positions or 512) - model.prompt_length
    device = next(model.parameters()).device
    results: list[dict] = []
    for i in range(0, len(inputs), batch_size):
        batch = list(inputs[i : i + batch_size])
        if model.task == "seq-cls":
            enc = tokenizer(batch, truncation=True, max_length=limit)
            logits = model(**_padded(tokenizer, enc, "right", device)).logits
            probs = logits.float().softmax(-1).cpu()
            results += [label_scores(row, names) for row in probs]
        else:
            words = [w.split() if isinstance(w, str) else list(w) for w in batch]
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=limit)
            logits = model(**_padded(tokenizer, enc, "right", device)).logits
            best = logits.argmax(-1).cpu()
            for b, ws in enumerate(words):
                results.append({"tokens": ws, "tags": word_tags(enc.word_ids(b), best[b].tolist(), names, len(ws))})
    return results
