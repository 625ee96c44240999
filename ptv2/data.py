"""Turning examples into model inputs, one template per task.

- seq-cls:   text (and optional second text) -> label id
- token-cls: pre-split words -> one tag per word, on its first sub-token (others ignored)
- causal-lm: prompt -> response; the loss is on the response tokens (and EOS) only

`collate` pads a list of encoded examples to the longest one (dynamic padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def _read_table(path: Path, fmt: str):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the suffix; set data.format")
    try:
        if fmt == "jsonl":
            return Dataset.from_json(str(path), keep_in_memory=True)
        if fmt == "csv":
            return Dataset.from_csv(str(path), keep_in_memory=True)
        return Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # datasets/pyarrow raise many kinds
        raise DataError(f"{path}: cannot be read as {fmt}: {str(e).splitlines()[0][:200]}") from e


def load_examples(path: str | Path, settings, task: str, labels: Sequence[str] | None, tokenizer) -> list[dict]:
    """Read a data file with HF datasets and encode every row with the task's template. Bad
    rows are collected and reported together, each with its file and row number."""
    path = Path(path)
    table = _read_table(path, settings.format)
    if task == "seq-cls":
        needed = [settings.text_column, settings.label_column] + (
            [settings.text_pair_column] if settings.text_pair_column else []
        )
    elif task == "token-cls":
        needed = [settings.tokens_column, settings.tags_column]
    else:
        needed = [settings.prompt_column, settings.response_column]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.column_names)})")
    examples, errors = [], []
    for i, row in enumerate(table):
        try:
            if task == "seq-cls":
                pair = row[settings.text_pair_column] if settings.text_pair_column else None
                label = row[settings.label_column]
                ex = encode_classification(
                    tokenizer,
                    row[settings.text_column],
                    None if label is None else str(label),
                    list(labels),
                    settings.max_length,
                    pair,
                )
                if label is None:
                    raise DataError("missing label")
            elif task == "token-cls":
                ex = encode_tagging(
                    tokenizer, row[settings.tokens_column], row[settings.tags_column], list(labels), settings.max_length
                )
            else:
                prompt = row[settings.prompt_column]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError("empty prompt")
                ex = encode_generation(
                    tokenizer,
                    settings.prompt_template.replace("{prompt}", prompt),
                    row[settings.response_column],
                    settings.max_length,
                )
        except DataError as e:
            errors.append(f"{path}:row {i + 1}: {e}")
            continue
        examples.append(ex)
    if errors:
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise DataError(f"{len(errors)} bad row(s): " + "; ".join(errors[:10]) + more)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
