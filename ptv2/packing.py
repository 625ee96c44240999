"""Sequence packing: several examples in one row, each seeing the prompt and only itself.

Generation data is short and uneven (chat replies: tens of tokens), so a batch padded to its
longest row is mostly padding. Packed, a row holds examples back to back up to `max_length`; each
token attends to the whole prompt (the prefix of every layer, or the soft prompt) and to the
earlier tokens of its own segment only, and positions restart per segment, so every example
computes exactly what it computes alone (`ptv2.prompt.prompt_inputs` builds that 4-D attention
mask from the segment ids). The loss stays a mean over labelled tokens: the first token of each
segment is never a target (it would be predicted from the previous segment).

The attention mask is an additive 4-D tensor, which transformers' SDPA and eager attention take
as it is (its defaults on CPU and GPU); flash-attention's variable-length path is not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptv2.tasks import IGNORE_INDEX

PACKED_KEYS = ("segment_ids", "segment_positions")


def pack(dataset, max_length: int, seed: int) -> list[dict]:
    """The examples of a tokenized dataset in rows of at most `max_length` tokens: a seeded
    shuffle, then first fit (each example into the first row it fits, a new row when none
    does). Deterministic for a dataset and seed: a resumed job packs the same rows."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[dict] = []
    room: list[int] = []
    for i in order:
        example = dataset[i]
        n = len(example["input_ids"])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append({"input_ids": [], "labels": [], "segment_ids": [], "segment_positions": []})
            room.append(max_length)
            slot = len(rows) - 1
        row, segment = rows[slot], (rows[slot]["segment_ids"] or [0])[-1] + 1
        row["input_ids"] += list(example["input_ids"])
        labels = list(example["labels"])
        row["labels"] += [IGNORE_INDEX] + labels[1:]  # never a target from the previous segment
        row["segment_ids"] += [segment] * n
        row["segment_positions"] += list(range(n))
        room[slot] -= n
    for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
    return rows


def packed_collator(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pads packed rows to the longest: pads get segment 0, label IGNORE_INDEX, mask 0."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "segment_ids": 0}
        fills["segment_positions"] = 0
        return {
            key: torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
            for key, fill in fills.items()
        }

    return collate


def segment_mask(segment_ids: torch.Tensor, kv_mask: torch.Tensor, soft_mask: torch.Tensor, dtype: torch.dtype):
    """The additive attention mask [batch, 1, soft + length, kv + soft + length] of a packed
    batch: soft-prompt positions attend causally among themselves, a token to its row's prefix,
    its soft prompt and the earlier tokens of its own segment; a pad attends to the prefix (a
    query row with nothing to attend to gives NaN in some kernels), and is never read."""
    batch, length = segment_ids.shape
    soft = soft_mask.shape[1]
    device = segment_ids.device
    tokens = torch.arange(length, device=device)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (tokens[:, None] >= tokens[None, :])
    same &= (segment_ids > 0)[:, :, None]
    soft_pos = torch.arange(soft, device=device)
    soft_rows = torch.cat(
        [
            kv_mask.bool()[:, None, :].expand(-1, soft, -1),
            (soft_pos[:, None] >= soft_pos[None, :])[None] & soft_mask.bool()[:, None, :],
            torch.zeros(batch, soft, length, dtype=torch.bool, device=device),
        ],
        dim=2,
    )
    token_rows = torch.cat(
        [
            kv_mask.bool()[:, None, :].expand(-1, length, -1),
            (soft_mask.bool()[:, None, :] & (segment_ids > 0)[:, :, None]),
            same,
        ],
        dim=2,
    )
    allowed = torch.cat([soft_rows, token_rows], dim=1)
    rows, kv = allowed.shape[1], kv_mask.shape[1]
    itself = torch.zeros(rows, allowed.shape[2], dtype=torch.bool, device=device)
    itself[torch.arange(rows), kv + torch.arange(rows)] = True
    allowed |= ~allowed.any(-1, keepdim=True) & itself  # a pad without a prefix either: itself
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
