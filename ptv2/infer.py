"""Inference with a loaded prompt: `generate` for causal LMs, `predict` for classifiers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ptv2.model import PromptedModel


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token")


@torch.no_grad()
def generate(
    model: PromptedModel,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    **gen_kwargs,
) -> list[str]:
    """Continue each prompt (greedy unless `do_sample=True` is given); returns the new text."""
    model.eval()
    pad = _pad_id(tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoders continue on the right
    try:
        outputs: list[str] = []
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            device = next(model.parameters()).device
            new = model.generate(
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=gen_kwargs.pop("do_sample", False),
                pad_token_id=pad,
                **gen_kwargs,
            )
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
        return outputs
    finally:
        tokenizer.padding_side = side


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
    {"tokens", "tags"}, one tag per word from its first sub-token; a string is split on spaces)."""
    if model.task not in ("seq-cls", "token-cls"):
        raise ValueError(f"predict needs a seq-cls or token-cls prompt, this one is for {model.task}")
    model.eval()
    names = _labels(model)
    limit = max_length or (model.geometry.max_positions or 512) - model.prompt_length
    device = next(model.parameters()).device
    results: list[dict] = []
    for i in range(0, len(inputs), batch_size):
        batch = list(inputs[i : i + batch_size])
        if model.task == "seq-cls":
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit)
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            probs = logits.float().softmax(-1).cpu()
            for row in probs:
                best = int(row.argmax())
                results.append(
                    {
                        "label": names[best],
                        "score": float(row[best]),
                        "scores": dict(zip(names, row.tolist(), strict=True)),
                    }
                )
        else:
            words = [w.split() if isinstance(w, str) else list(w) for w in batch]
            enc = tokenizer(
                words, is_split_into_words=True, return_tensors="pt", padding=True, truncation=True, max_length=limit
            )
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            best = logits.argmax(-1).cpu()
            for b, ws in enumerate(words):
                tags = ["O"] * len(ws)
                seen = set()
                for t, w in enumerate(enc.word_ids(b)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        tags[w] = names[int(best[b, t])]
                results.append({"tokens": ws, "tags": tags})
    return results
