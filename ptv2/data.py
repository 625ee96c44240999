"""Turning a data file into model inputs with the task's template, and feeding them to the ranks.

How a row becomes token ids is the task's (`ptv2.tasks`: a text and its label, words and their
tags, a prompt and its response); the helpers every task shares are here. A file (a local path
or a storage URI) is read and tokenized once with HF `datasets` (`map(batched=True)`, cached on
the node's local disk, the first process of a node first); every row is checked on the way and
all bad rows are reported together, with file and row, before any training starts.
`BatchStream` then hands each rank its own shard of every epoch's shuffle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ptv2 import storage
from ptv2.errors import first_line
from ptv2.tasks import Task, task_of


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


# ---- files: read, check every row, tokenize in batches ------------------------------------
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def local_file(path: str | Path) -> Path:
    """A data file as a local path: storage URIs are fetched once into the node's cache."""
    try:
        return storage.cached_copy(str(path), cache_dir() / "files")
    except (storage.StorageError, OSError) as e:
        raise DataError(f"{path}: {e}") from e


def data_format(path: str | Path, fmt: str = "auto") -> str:
    """jsonl, csv or parquet: `fmt`, or what the file name's suffix says when it is "auto"."""
    if fmt == "auto":
        fmt = FORMATS.get(Path(storage.basename(str(path))).suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the suffix; set data.format")
    return fmt


def read_table(path: str | Path, fmt: str = "auto", in_memory: bool = True):
    """A data file (path or storage URI) as an HF `datasets.Dataset`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    local = local_file(path)
    if not local.is_file():
        raise DataError(f"{path}: no such data file")
    if local.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    fmt = data_format(path, fmt)
    reader = {"jsonl": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet}[fmt]
    kwargs = {"keep_in_memory": True} if in_memory else {"cache_dir": str(cache_dir() / "datasets")}
    try:
        return reader(str(local), **kwargs)
    except Exception as e:  # datasets/pyarrow raise many kinds
        raise DataError(f"{path}: cannot be read as {fmt}: {first_line(e, 200)}") from e


def load_examples(
    path: str | Path, settings, task: str | Task, labels: Sequence[str] | None, tokenizer, cache: bool = False
):
    """Read a data file (path or storage URI) and encode every row with the task's template
    (`ptv2.tasks`), in batches; returns an HF `Dataset` of token ids and labels.
    Bad rows are collected and reported together, each with its file and row number.
    `cache=True` keeps the tokenized table in the node's datasets cache, so other processes (and
    later runs) on the node reuse it."""
    task = task_of(task)
    table = read_table(path, settings.format, in_memory=not cache)
    missing = [c for c in task.columns(settings) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise DataError(f"{path}: no examples")
    return _encoded(table, str(path), settings, task, labels, tokenizer, cache)


def encode_examples(
    examples: list[dict], settings, task: str | Task, labels: Sequence[str] | None, tokenizer
) -> list[dict]:
    """Rows given in memory (column -> value each), encoded exactly as a file's rows are."""
    from datasets import Dataset

    return list(_encoded(Dataset.from_list(examples), "examples", settings, task_of(task), labels, tokenizer, False))


def _encoded(table, where: str, settings, task, labels, tokenizer, cache: bool):
    encoded = encode_table(
        table, settings, task, labels, tokenizer, cache, desc=f"tokenizing {storage.basename(where)}"
    )
    bad = [(i, e) for i, e in enumerate(encoded["_error"]) if e]
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        shown = "; ".join(f"{where}:row {i + 1}: {e}" for i, e in bad[:10])
        raise DataError(f"{len(bad)} bad row(s): {shown}{more}")
    return encoded.remove_columns("_error")


def encode_table(table, settings, task: str | Task, labels, tokenizer, cache: bool = False, desc: str | None = None):
    """Every row of `table` encoded by the task, bad ones included: "_error" says why a row is bad
    (empty when it is good)."""
    task = task_of(task)

    def encode(batch: dict) -> dict:
        out = task.encode(batch, settings, list(labels or []), tokenizer)
        out["_error"] = [
            e or ("" if ids else "tokenizes to no tokens (is the tokenizer right for this text?)")
            for e, ids in zip(out["_error"], out["input_ids"], strict=True)
        ]
        return out

    return table.map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=table.column_names,
        keep_in_memory=not cache,
        load_from_cache_file=cache,
        desc=desc,
    )


def rows(dataset, indices: Sequence[int]) -> list[dict]:
    """Examples `indices` of a tokenized dataset as a list of dicts (what collators take)."""
    if isinstance(dataset, list):
        return [dataset[i] for i in indices]
    batch = dataset[list(indices)]
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


# ---- batches -----------------------------------------------------------------------------
def collator(tokenizer, task: str | Task) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Dynamic padding to the longest example, by the task's transformers collator; a tokenizer
    without a pad token pads with its EOS."""
    ensure_pad_token(tokenizer)
    inner = task_of(task).collator(tokenizer)

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
