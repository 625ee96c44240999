"""Evaluation that is correct across ranks.

Every rank takes an equal number of batches (ZeRO-3 forwards are collective), padding its shard
by repeating examples that are then masked out, so no example is counted twice or missed. Each
rank adds up its task's counts (`ptv2.tasks.Counter`: loss, correct, per-class or per-entity
true positives...); one all-reduce adds every rank's; the task turns the totals into metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ptv2.data import rows
from ptv2.distributed import all_sum
from ptv2.tasks import Task, task_of


def shard(n: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """(index, counts) pairs for `rank`: an equal share per rank, padded with masked repeats."""
    per_rank = -(-n // world)
    own = list(range(rank, n, world))
    return [(i, True) for i in own] + [(own[0] if own else 0, False)] * (per_rank - len(own))


@torch.no_grad()
def evaluate(
    forward: Callable,
    examples,
    task: str | Task,
    labels: Sequence[str] | None,
    batch_size: int,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """The task's metrics over `examples`, identical on every rank. `forward(**batch)` is the
    model's forward (a PromptedModel or its DeepSpeed engine); `collate` pads a list of examples
    into a batch. Causal LMs are scored on the device at labelled next tokens only."""
    counter = task_of(task).counter(labels)
    items = shard(len(examples), rank, world)
    sums = torch.zeros(counter.size, dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate(rows(examples, [i for i, _ in chunk]))
        valid = torch.tensor([v for _, v in chunk])
        gold = batch.pop("labels")
        sums += counter.count(forward, {k: v.to(device) for k, v in batch.items()}, gold, valid)
    return counter.metrics(all_sum(sums.tolist(), device))
