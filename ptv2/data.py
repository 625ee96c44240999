"""Turning a data file into model inputs, one template per task, and feeding them to the ranks.

- seq-cls:   text (and optional second text) -> label id
- token-cls: pre-split words -> one tag per word, on its first sub-token (others ignored)
- causal-lm: prompt -> response; the loss is on the response tokens (and EOS) only

A file (a local path or a storage URI) is read and tokenized once with HF `datasets`
(`map(batched=True)`, cached on the node's local disk, the first process of a node first); every
row is checked on the way and all bad rows are reported together, with file and row, before
any training starts. `BatchStream` then hands each rank its own shard of every epoch's shuffle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ptv2 import storage
from ptv2.errors import first_line

IGNORE_INDEX = -100
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class DataError(ValueError):
    """A bad example or data file; the message names the file and row where known."""


def cache_dir() -> Path:
    return Path(os.environ.get("PTV2_CACHE", Path.home() / ".cache" / "ptv2"))


def ensure_pad_token(tokenizer) -> int:
    """The pad id, borrowing EOS (or UNK) for tokenizers that have none (GPT-2, Llama 3): padded
    positions are masked out, so which token fills them does not matter."""
    if tokenizer.pad_token_id is None:
        fill = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fill is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fill
    return tokenizer.pad_token_id


# ---- templates: one example --------------------------------------------------------------
def encode_classification(
    tokenizer, text: str, label: str | None, label_names: Sequence[str], max_length: int, text_pair: str | None = None
) -> dict:
    """One classification example (inference and tests); files go through `load_examples`."""
    if not isinstance(text, str) or not text.strip():
        raise DataError("empty text")
    enc = tokenizer(text, text_pair, truncation=True, max_length=max_length)
    out = {k: list(v) for k, v in enc.items() if k in TOKEN_KEYS}
    if label is not None:
        if label not in label_names:
            raise DataError(f"unknown label {label!r} (known: {', '.join(map(str, label_names))})")
        out["labels"] = list(label_names).index(label)
    return out


def tag_labels(word_ids: Sequence[int | None], tags: Sequence[str], label_names: Sequence[str]) -> list[int]:
    """One label per word on its first sub-token; IGNORE_INDEX elsewhere."""
    labels, seen = [], set()
    for w in word_ids:
        if w is None or w in seen:
            labels.append(IGNORE_INDEX)
        else:
            seen.add(w)
            labels.append(list(label_names).index(tags[w]))
    return labels


def encode_tagging(
    tokenizer, words: Sequence[str], tags: Sequence[str] | None, label_names: Sequence[str], max_length: int
) -> dict:
    if not words:
        raise DataError("empty token list")
    if tags is not None and len(tags) != len(words):
        raise DataError(f"{len(words)} tokens but {len(tags)} tags")
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_length)
    out = {k: list(v) for k, v in enc.items() if k in TOKEN_KEYS}
    if tags is not None:
        unknown = sorted({t for t in tags if t not in label_names})
        if unknown:
            raise DataError(f"unknown tag(s) {', '.join(unknown)}")
        out["labels"] = tag_labels(enc.word_ids(), tags, label_names)
    return out


def join_generation(p: list[int], r: list[int] | None, eos: int | None, max_length: int) -> dict:
    """[prompt][response][eos] within `max_length`, labels on the response (and EOS) only.

    What a too-long example keeps: the end of the prompt (the words right before the reply) and
    the start of the response. The prompt keeps at least half of `max_length` (all of itself if
    shorter) so the reply stays conditioned on it; the response takes the rest. A response cut
    short ends without EOS: the model must not learn to stop where the text was cut."""
    if r is None:
        kept = p[-max_length:]
        return {"input_ids": kept, "attention_mask": [1] * len(kept)}
    full = r + ([eos] if eos is not None else [])
    prompt_room = max(max_length - len(full), min(len(p), max_length // 2))
    p = p[len(p) - min(len(p), prompt_room) :]
    r = full[: max_length - len(p)]
    ids = p + r
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + r}


def encode_generation(tokenizer, prompt: str, response: str | None, max_length: int) -> dict:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("empty prompt")
    if response is not None and (not isinstance(response, str) or not response.strip()):
        raise DataError("empty response")
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = None if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]
    return join_generation(p, r, tokenizer.eos_token_id, max_length)


# ---- files: read, check every row, tokenize in batches ------------------------------------
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _local(path: str | Path) -> Path:
    """A data file as a local path: storage URIs are fetched once into the node's cache."""
    try:
        return storage.cached_copy(str(path), cache_dir() / "files")
    except (storage.StorageError, OSError) as e:
        raise DataError(f"{path}: {e}") from e


def read_table(path: str | Path, fmt: str = "auto", in_memory: bool = True):
    """A data file (path or storage URI) as an HF `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    local = _local(path)
    if not local.is_file():
        raise DataError(f"{path}: no such data file")
    if local.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if fmt == "auto":
        fmt = FORMATS.get(Path(storage.basename(str(path))).suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the suffix; set data.format")
    reader = {"jsonl": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet}[fmt]
    kwargs = {"keep_in_memory": True} if in_memory else {"cache_dir": str(cache_dir() / "datasets")}
    try:
        return reader(str(local), **kwargs)
    except Exception as e:  # datasets/pyarrow raise many kinds
        raise DataError(f"{path}: cannot be read as {fmt}: {first_line(e, 200)}") from e


def _columns(settings, task: str) -> list[str]:
    if task == "seq-cls":
        return [settings.text_column, settings.label_column] + (
            [settings.text_pair_column] if settings.text_pair_column else []
        )
    if task == "token-cls":
        return [settings.tokens_column, settings.tags_column]
    return [settings.prompt_column, settings.response_column]


def _blank(value) -> bool:
    return not isinstance(value, str) or not value.strip()


class _Encoder:
    """The batched `datasets.map` function of one task: checks each row (an `_error` column,
    empty when good), then tokenizes the whole batch at once."""

    def __init__(self, settings, task: str, labels: Sequence[str] | None, tokenizer) -> None:
        self.s, self.task, self.tokenizer = settings, task, tokenizer
        self.labels = list(labels or [])

    def __call__(self, batch: dict) -> dict:
        out = {"seq-cls": self._classify, "token-cls": self._tag, "causal-lm": self._generate}[self.task](batch)
        out["_error"] = [
            e or ("" if ids else "tokenizes to no tokens (is the tokenizer right for this text?)")
            for e, ids in zip(out["_error"], out["input_ids"], strict=True)
        ]
        return out

    def _classify(self, batch: dict) -> dict:
        s, known = self.s, set(self.labels)
        texts, raw = batch[s.text_column], batch[s.label_column]
        pairs = batch[s.text_pair_column] if s.text_pair_column else None
        errors = []
        for i, (text, label) in enumerate(zip(texts, raw, strict=True)):
            errors.append(
                "empty text"
                if _blank(text)
                else "empty second text"
                if pairs is not None and _blank(pairs[i])
                else "missing label"
                if label is None
                else f"unknown label {str(label)!r} (known: {', '.join(self.labels)})"
                if str(label) not in known
                else ""
            )
        ok = [not e for e in errors]
        enc = self.tokenizer(
            [t if good else "" for t, good in zip(texts, ok, strict=True)],
            None if pairs is None else [p if good else "" for p, good in zip(pairs, ok, strict=True)],
            truncation=True,
            max_length=s.max_length,
        )
        out = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        out["labels"] = [self.labels.index(str(v)) if good else IGNORE_INDEX for v, good in zip(raw, ok, strict=True)]
        return {**out, "_error": errors}

    def _tag(self, batch: dict) -> dict:
        s, known = self.s, set(self.labels)
        words, tags = batch[s.tokens_column], batch[s.tags_column]
        errors = []
        for w, t in zip(words, tags, strict=True):
            if not w:
                errors.append("empty token list")
            elif t is None:
                errors.append("missing tags")
            elif len(t) != len(w):
                errors.append(f"{len(w)} tokens but {len(t)} tags")
            elif any(x is None or x not in known for x in t):
                errors.append(f"unknown tag(s) {', '.join(sorted({str(x) for x in t if x not in known}))}")
            elif any(not isinstance(x, str) for x in w):
                errors.append("tokens must be strings")
            else:
                errors.append("")
        ok = [not e for e in errors]
        enc = self.tokenizer(
            [list(w) if good else ["x"] for w, good in zip(words, ok, strict=True)],
            is_split_into_words=True,
            truncation=True,
            max_length=s.max_length,
        )
        out = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        out["labels"] = [
            tag_labels(enc.word_ids(i), t, self.labels) if good else [IGNORE_INDEX] * len(enc["input_ids"][i])
            for i, (t, good) in enumerate(zip(tags, ok, strict=True))
        ]
        return {**out, "_error": errors}

    def _generate(self, batch: dict) -> dict:
        s = self.s
        prompts, responses = batch[s.prompt_column], batch[s.response_column]
        errors = [
            "empty prompt" if _blank(p) else "missing response" if r is None else "empty response" if _blank(r) else ""
            for p, r in zip(prompts, responses, strict=True)
        ]
        ok = [not e for e in errors]
        p_ids = self.tokenizer(
            [s.prompt_template.replace("{prompt}", p) if good else "" for p, good in zip(prompts, ok, strict=True)],
            add_special_tokens=True,
        )["input_ids"]
        r_ids = self.tokenizer(
            [r if good else "" for r, good in zip(responses, ok, strict=True)], add_special_tokens=False
        )["input_ids"]
        rows = [
            join_generation(p, r, self.tokenizer.eos_token_id, s.max_length) for p, r in zip(p_ids, r_ids, strict=True)
        ]
        for i, r in enumerate(r_ids):  # an EOS alone would teach nothing but stopping
            if ok[i] and not r:
                errors[i] = "the response tokenizes to no tokens (is the tokenizer right for this text?)"
        return {**{k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}, "_error": errors}


def load_examples(path: str | Path, settings, task: str, labels: Sequence[str] | None, tokenizer, cache: bool = False):
    """Read a data file (path or storage URI) and encode every row with the task's template, in
    batches; returns an HF `Dataset` of token ids and labels. Bad rows are collected and reported
    together, each with its file and row number. `cache=True` keeps the tokenized table in the
    node's datasets cache, so other processes (and later runs) on the node reuse it."""
    table = read_table(path, settings.format, in_memory=not cache)
    needed = _columns(settings, task)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise DataError(f"{path}: no examples")
    encoded = table.map(
        _Encoder(settings, task, labels, tokenizer),
        batched=True,
        batch_size=1000,
        remove_columns=table.column_names,
        keep_in_memory=not cache,
        load_from_cache_file=cache,
        desc=f"tokenizing {storage.basename(str(path))}",
    )
    bad = [(i, e) for i, e in enumerate(encoded["_error"]) if e]
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        shown = "; ".join(f"{path}:row {i + 1}: {e}" for i, e in bad[:10])
        raise DataError(f"{len(bad)} bad row(s): {shown}{more}")
    return encoded.remove_columns("_error")


def rows(dataset, indices: Sequence[int]) -> list[dict]:
    """Examples `indices` of a tokenized dataset as a list of dicts (what collators take)."""
    if isinstance(dataset, list):
        return [dataset[i] for i in indices]
    batch = dataset[list(indices)]
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


# ---- batches -----------------------------------------------------------------------------
def collator(tokenizer, task: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Dynamic padding to the longest example, by transformers' collators: scalar labels stack
    (seq-cls), per-token labels pad with IGNORE_INDEX (token-cls, causal-lm)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    ensure_pad_token(tokenizer)
    if task == "seq-cls":
        inner = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    elif task == "token-cls":
        inner = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    else:  # decoder-only: labels are as long as the inputs, padded the same way
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        return dict(inner([{k: v for k, v in f.items() if v is not None} for f in features]))

    return collate


class BatchStream:
    """This rank's micro-batches, forever: every epoch a seeded shuffle of the whole data set,
    padded by repeats so that every rank gets the same number of full micro-batches (ZeRO-3
    forwards are collective), rank r taking every world-th example. Resumable at any micro-batch."""

    def __init__(self, dataset, micro_batch: int, rank: int, world: int, seed: int) -> None:
        self.dataset, self.micro_batch, self.rank, self.world, self.seed = dataset, micro_batch, rank, world, seed
        self.per_epoch = max(1, math.ceil(math.ceil(len(dataset) / world) / micro_batch))

    def from_micro(self, start: int) -> Iterator[list[dict]]:
        micro = start
        n = len(self.dataset)
        while True:
            epoch, offset = divmod(micro, self.per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            need = self.per_epoch * self.micro_batch * self.world
            mine = (order * math.ceil(need / n))[:need][self.rank :: self.world]
            for b in range(offset, self.per_epoch):
                yield rows(self.dataset, mine[b * self.micro_batch : (b + 1) * self.micro_batch])
            micro = (epoch + 1) * self.per_epoch


def first_tokens(dataset, length: int) -> torch.Tensor:
    """The first `length` tokens of the data in file order (examples joined as tokenized,
    special tokens included): what prompt init "text" starts from."""
    ids: list[int] = []
    for i in range(len(dataset)):
        ids += list(dataset[i]["input_ids"])[: length - len(ids)]
        if len(ids) == length:
            return torch.tensor(ids)
    raise DataError(f"prompt init 'text' needs {length} training tokens, the data has only {len(ids)}")
