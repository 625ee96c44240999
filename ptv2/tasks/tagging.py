"""token-cls: pre-split words -> one tag per word, on its first sub-token (the others are
ignored); entity precision, recall and F1 as seqeval scores them."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ptv2.errors import BadInput
from ptv2.tasks.base import IGNORE_INDEX, TOKEN_KEYS, Counter, Task, own_module, refuse_other_tensors, split_prefix

_BIO = re.compile(r"O|[BIES]-.+")


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of every entity in BIO `tags` (end exclusive), chunked by seqeval, the
    scorer NER results are reported with, in its default mode: conlleval's rules, so an I- tag
    that does not continue an entity of its type starts one (strict IOB2 would drop it, while
    the CoNLL and WNUT shared tasks scored with conlleval). Returned as spans, not a score, so
    each rank counts true positives, predicted and gold entities, and one all-reduce adds them."""
    from seqeval.metrics.sequence_labeling import get_entities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {(kind, start, end + 1) for kind, start, end in get_entities(list(tags))}


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


class TokenClassification(Task):
    name = "token-cls"
    auto_class_name = "AutoModelForTokenClassification"
    primary = ("entity_f1", "max")
    metrics = {"loss": "min", "accuracy": "max", "entity_precision": "max", "entity_recall": "max", "entity_f1": "max"}

    def columns(self, data) -> list[str]:
        return [data.tokens_column, data.tags_column]

    def target_column(self, data) -> str:
        return data.tags_column

    def label_names(self, values) -> set[str]:
        return {str(tag) for row in values if row for tag in row}

    def encode(self, batch: dict, data, labels, tokenizer) -> dict:
        known = set(labels)
        words, tags = batch[data.tokens_column], batch[data.tags_column]
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
        enc = tokenizer(
            [list(w) if good else ["x"] for w, good in zip(words, ok, strict=True)],
            is_split_into_words=True,
            truncation=True,
            max_length=data.max_length,
        )
        out = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        out["labels"] = [
            tag_labels(enc.word_ids(i), t, labels) if good else [IGNORE_INDEX] * len(enc["input_ids"][i])
            for i, (t, good) in enumerate(zip(tags, ok, strict=True))
        ]
        return {**out, "_error": errors}

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    # ---- the model -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor], **kwargs):
        prompted = model.inputs(**batch)
        out = model.base(**prompted.kwargs, use_cache=False, **kwargs)
        if prompted.soft:
            out.logits = out.logits[:, prompted.soft :]  # callers see one row per token
        return out

    def counter(self, labels) -> Counter:
        return TagCounts(list(labels))

    # ---- serving ----------------------------------------------------------------------------------
    def head(self, base, tensors, labels):
        return TokenHead(base, tensors, len(labels))

    def predict_input(self, text) -> tuple[list, dict, list[str]]:
        """(what to tokenize, tokenizer options, words) of one input to tag: words, or a text
        split on spaces."""
        words = text.split() if isinstance(text, str) else list(text)
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise BadInput("empty input: token-cls needs words to tag (a text, or a list of non-empty words)")
        return [words], {"is_split_into_words": True}, words

    def result(self, row, logits: torch.Tensor, labels: list[str]) -> dict:
        """{"tokens", "tags", "entities"}: one tag per word (from its first sub-token); entity spans
        where the tags are BIO-style (seqeval's reading), else None."""
        tags = word_tags(row.word_ids, logits.argmax(-1).cpu().tolist(), labels, len(row.words))
        entities = None
        if all(_BIO.fullmatch(label) for label in labels):
            spans = sorted(entity_spans(tags), key=lambda s: s[1])
            entities = [{"type": kind, "start": s, "end": e, "text": " ".join(row.words[s:e])} for kind, s, e in spans]
        return {"tokens": row.words, "tags": tags, "entities": entities}


def word_tags(word_ids: Sequence[int | None], best: Sequence[int], names: Sequence[str], n_words: int) -> list[str]:
    """One tag per word, from the predicted class (`best`, per sub-token) of its first sub-token."""
    tags = ["O"] * n_words
    seen = set()
    for t, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            tags[w] = names[int(best[t])]
    return tags


class TagCounts(Counter):
    """Loss and accuracy over the tagged sub-tokens; entities true positive, predicted and gold."""

    size = 7

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def count(self, forward, inputs, gold, valid):
        logits = forward(**inputs).logits.float().cpu()  # [batch, length, labels]
        mask = (gold != IGNORE_INDEX) & valid[:, None]
        loss = F.cross_entropy(logits.transpose(1, 2), gold.clamp(min=0), reduction="none")
        pred = logits.argmax(-1)
        out = [float(loss[mask].sum()), float(mask.sum()), float((pred == gold)[mask].sum()), float(mask.sum())]
        tp = predicted = actual = 0
        for b in range(len(gold)):
            if not valid[b]:
                continue
            m = gold[b] != IGNORE_INDEX
            g = entity_spans([self.labels[i] for i in gold[b][m].tolist()])
            p = entity_spans([self.labels[i] for i in pred[b][m].tolist()])
            tp, predicted, actual = tp + len(g & p), predicted + len(p), actual + len(g)
        return torch.tensor(out + [tp, predicted, actual], dtype=torch.float64)

    def metrics(self, sums):
        tp, predicted, actual = sums[4], sums[5], sums[6]
        return {
            "loss": sums[0] / max(sums[1], 1),
            "accuracy": sums[2] / max(sums[3], 1),
            "entity_precision": tp / predicted if predicted else 0.0,
            "entity_recall": tp / actual if actual else 0.0,
            "entity_f1": 2 * tp / (predicted + actual) if predicted + actual else 0.0,
        }


class TokenHead:
    """A served token-cls prompt's head: one label per token."""

    def __init__(self, base, tensors: dict[str, torch.Tensor], num_labels: int) -> None:
        t = base.head_template(TokenClassification.name, num_labels)
        self.name = t.name
        own = split_prefix(tensors, f"{t.name}.")
        self.module = own_module(t.module, own)
        refuse_other_tensors(tensors, {f"{t.name}.{k}" for k in own}, TokenClassification.name)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"head": self.module}

    def logits(self, hidden: torch.Tensor, batch, rows: list[int]) -> list[torch.Tensor]:
        tokens = batch.input_mask[:, batch.soft :].bool()
        spans = [hidden[i, batch.soft :][tokens[i].to(hidden.device)] for i in rows]
        out = self.module(torch.cat(spans))
        return list(out.split([len(s) for s in spans]))
