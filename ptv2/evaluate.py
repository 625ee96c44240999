"""Evaluation that is correct across ranks.

Every rank takes an equal number of batches (ZeRO-3 forwards are collective), padding its shard
by repeating examples that are then masked out, so no example is counted twice or missed. Each
rank sums counts (loss, correct, per-class and per-entity tp/fp/fn); one all-reduce adds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ptv2.data import IGNORE_INDEX, rows
from ptv2.distributed import all_sum

if TYPE_CHECKING:
    from ptv2.model import LabelledTokenStats


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of every entity in BIO `tags` (end exclusive), chunked by seqeval, the
    scorer NER results are reported with, in its default mode: conlleval's rules, so an I- tag
    that does not continue an entity of its type starts one (strict IOB2 would drop it, while
    the CoNLL and WNUT shared tasks scored with conlleval). Returned as spans, not a score, so
    each rank counts true positives, predicted and gold entities, and one all-reduce adds them."""
    from seqeval.metrics.sequence_labeling import get_entities

    return {(kind, start, end + 1) for kind, start, end in get_entities(list(tags))}


def shard(n: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """(index, counts) pairs for `rank`: an equal share per rank, padded with masked repeats."""
    per_rank = -(-n // world)
    own = list(range(rank, n, world))
    return [(i, True) for i in own] + [(own[0] if own else 0, False)] * (per_rank - len(own))


@torch.no_grad()
def evaluate(
    forward: Callable[..., torch.Tensor],
    examples: list[dict],
    task: str,
    labels: Sequence[str] | None,
    batch_size: int,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    rank: int,
    world: int,
    device: torch.device,
    labelled: Callable[..., LabelledTokenStats] | None = None,
) -> dict[str, float]:
    """`forward(**batch)` returns logits; `collate` pads a list of examples into a batch.
    Metrics are identical on every rank.

    Causal LMs are scored on the device at labelled next tokens only: by `labelled(**batch,
    labels=...)` where given (e.g. `lambda **b: engine(**b, labelled_stats=True)`: the LM head
    runs only there), else from `forward`'s logits, gathered there before any copy."""
    items = shard(len(examples), rank, world)
    n_labels = len(labels) if labels else 0
    # sums: [loss, n_loss, correct, n_acc, tp.. (per class or entity), pred.., gold..]
    sums = torch.zeros(4 + 3 * max(n_labels, 1), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate(rows(examples, [i for i, _ in chunk]))
        valid = torch.tensor([v for _, v in chunk])
        gold = batch.pop("labels")
        inputs = {k: v.to(device) for k, v in batch.items()}
        if task == "causal-lm":
            gold = gold.masked_fill(~valid[:, None], IGNORE_INDEX).to(device)  # padded repeats do not count
            if labelled is not None:
                stats = labelled(**inputs, labels=gold)
                loss_sum, count, correct = stats.loss_sum, stats.count, stats.correct
            else:
                target = gold[:, 1:]
                keep = target != IGNORE_INDEX
                logits = forward(**inputs)[:, :-1][keep].float()  # next-token logits, labelled positions
                loss_sum = F.cross_entropy(logits, target[keep], reduction="sum")
                count, correct = keep.sum(), (logits.argmax(-1) == target[keep]).sum()
            sums[0] += float(loss_sum)
            sums[1] += int(count)
            sums[2] += int(correct)
            sums[3] += int(count)
            continue
        logits = forward(**inputs).float().cpu()  # [batch, labels] or [batch, length, labels]: small
        if task == "seq-cls":
            loss = F.cross_entropy(logits, gold, reduction="none")
            pred = logits.argmax(-1)
            sums[0] += loss[valid].sum()
            sums[1] += valid.sum()
            sums[2] += (pred == gold)[valid].sum()
            sums[3] += valid.sum()
            for c in range(n_labels):
                p, g = (pred == c) & valid, (gold == c) & valid
                sums[4 + c] += (p & g).sum()
                sums[4 + n_labels + c] += p.sum()
                sums[4 + 2 * n_labels + c] += g.sum()
            continue
        mask = (gold != IGNORE_INDEX) & valid[:, None]
        loss = F.cross_entropy(logits.transpose(1, 2), gold.clamp(min=0), reduction="none")
        pred = logits.argmax(-1)
        sums[0] += loss[mask].sum()
        sums[1] += mask.sum()
        sums[2] += (pred == gold)[mask].sum()
        sums[3] += mask.sum()
        if task == "token-cls":
            for b in range(len(chunk)):
                if not chunk[b][1]:
                    continue
                m = gold[b] != IGNORE_INDEX
                g = entity_spans([labels[i] for i in gold[b][m].tolist()])
                p = entity_spans([labels[i] for i in pred[b][m].tolist()])
                sums[4] += len(g & p)
                sums[5] += len(p)
                sums[6] += len(g)
    s = all_sum(sums.tolist(), device)
    out = {"loss": s[0] / max(s[1], 1), "accuracy": s[2] / max(s[3], 1)}
    if task == "seq-cls":
        f1s = []
        for c in range(n_labels):
            tp, npred, ngold = s[4 + c], s[4 + n_labels + c], s[4 + 2 * n_labels + c]
            f1s.append(2 * tp / (npred + ngold) if npred + ngold else 0.0)
        out["macro_f1"] = sum(f1s) / n_labels
    elif task == "token-cls":
        tp, npred, ngold = s[4], s[5], s[6]
        out["entity_precision"] = tp / npred if npred else 0.0
        out["entity_recall"] = tp / ngold if ngold else 0.0
        out["entity_f1"] = 2 * tp / (npred + ngold) if npred + ngold else 0.0
    else:
        out["perplexity"] = float(torch.tensor(out["loss"]).exp())
    return out


PRIMARY_METRIC = {"seq-cls": ("accuracy", "max"), "token-cls": ("entity_f1", "max"), "causal-lm": ("loss", "min")}
# Every metric `evaluate` returns for a task, and whether higher is better.
METRICS = {
    "seq-cls": {"loss": "min", "accuracy": "max", "macro_f1": "max"},
    "token-cls": {
        "loss": "min",
        "accuracy": "max",
        "entity_precision": "max",
        "entity_recall": "max",
        "entity_f1": "max",
    },
    "causal-lm": {"loss": "min", "accuracy": "max", "perplexity": "min"},
}
