"""Turning examples into model inputs, one template per task.

- seq-cls:   text (and optional second text) -> label id
- token-cls: pre-split words -> one tag per word, on its first sub-token (others ignored)
- causal-lm: prompt -> response; the loss is on the response tokens (and EOS) only

`collate` pads a list of encoded examples to the longest one (dynamic padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A bad example; the message names the file and row where known."""


def encode_classification(
    tokenizer, text: str, label: str | None, label_names: Sequence[str], max_length: int, text_pair: str | None = None
) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise DataError("empty text")
    enc = tokenizer(text, text_pair, truncation=True, max_length=max_length)
    out = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if label is not None:
        if label not in label_names:
            raise DataError(f"unknown label {label!r} (known: {', '.join(map(str, label_names))})")
        out["labels"] = label_names.index(label)
    return out


def encode_tagging(
    tokenizer, words: Sequence[str], tags: Sequence[str] | None, label_names: Sequence[str], max_length: int
) -> dict:
    if not words:
        raise DataError("empty token list")
    if tags is not None and len(tags) != len(words):
        raise DataError(f"{len(words)} tokens but {len(tags)} tags")
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_length)
    out = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if tags is not None:
        unknown = sorted({t for t in tags if t not in label_names})
        if unknown:
            raise DataError(f"unknown tag(s) {', '.join(unknown)}")
        labels, seen = [], set()
        for w in enc.word_ids():
            if w is None or w in seen:
                labels.append(IGNORE_INDEX)
            else:
                seen.add(w)
                labels.append(label_names.index(tags[w]))
        out["labels"] = labels
    return out


def encode_generation(tokenizer, prompt: str, response: str | None, max_length: int) -> dict:
    """[prompt tokens][response tokens][eos]; labels are IGNORE_INDEX on the prompt. Long
    examples lose the start of the prompt, never the response."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("empty prompt")
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if response is None:
        return {"input_ids": p[-max_length:], "attention_mask": [1] * min(len(p), max_length)}
    if not isinstance(response, str) or not response.strip():
        raise DataError("empty response")
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    r = r[: max_length - 1]
    p = p[-(max_length - len(r)) :]
    ids = p + r
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + r}


def collate(features: Sequence[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example; labels pad with IGNORE_INDEX, scalar labels stack."""
    longest = max(len(f["input_ids"]) for f in features)
    out: dict[str, list] = {}
    for key in features[0]:
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
        rows = []
        for f in features:
            v = f[key]
            if isinstance(v, int):
                rows.append(v)
                continue
            pad = [fill] * (longest - len(v))
            rows.append(pad + list(v) if side == "left" else list(v) + pad)
        out[key] = rows
    return {k: torch.tensor(v) for k, v in out.items()}
