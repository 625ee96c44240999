"""seq-cls: a text (and an optional second text) -> one label, from the task head transformers
builds (BERT's pooler + classifier, RoBERTa's classification head, a decoder's score layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from ptv2.errors import ArtifactError, BadInput
from ptv2.tasks.base import (
    IGNORE_INDEX,
    TOKEN_KEYS,
    Counter,
    Task,
    blank,
    own_module,
    refuse_other_tensors,
    split_prefix,
)


class SequenceClassification(Task):
    name = "seq-cls"
    auto_class_name = "AutoModelForSequenceClassification"
    every_label_seen = True
    primary = ("accuracy", "max")
    metrics = {"loss": "min", "accuracy": "max", "macro_f1": "max"}

    def columns(self, data) -> list[str]:
        return [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])

    def target_column(self, data) -> str:
        return data.label_column

    def label_names(self, values) -> set[str]:
        return {str(v) for v in values if v is not None}

    def encode(self, batch: dict, data, labels, tokenizer) -> dict:
        known = set(labels)
        texts, raw = batch[data.text_column], batch[data.label_column]
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        errors = []
        for i, (text, label) in enumerate(zip(texts, raw, strict=True)):
            errors.append(
                "empty text"
                if blank(text)
                else "empty second text"
                if pairs is not None and blank(pairs[i])
                else "missing label"
                if label is None
                else f"unknown label {str(label)!r} (known: {', '.join(labels)})"
                if str(label) not in known
                else ""
            )
        ok = [not e for e in errors]
        enc = tokenizer(
            [t if good else "" for t, good in zip(texts, ok, strict=True)],
            None if pairs is None else [p if good else "" for p, good in zip(pairs, ok, strict=True)],
            truncation=True,
            max_length=data.max_length,
        )
        out = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        out["labels"] = [labels.index(str(v)) if good else IGNORE_INDEX for v, good in zip(raw, ok, strict=True)]
        return {**out, "_error": errors}

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")  # scalar labels stack

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]

    # ---- the model -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor], **kwargs):
        if not model.geometry.is_decoder:  # encoders classify from their first position, as HF's heads do
            return model.base(**model.inputs(**batch).kwargs, use_cache=False, **kwargs)
        return self.last_token(model, batch, **kwargs)

    def last_token(self, model, batch: dict[str, torch.Tensor], **kwargs):
        """A decoder classifies from its last real token, found from the attention mask.

        HF's decoder classifiers look for the last token that is not `pad_token_id` in
        `input_ids`: with prompt tuning there are no input_ids (inputs_embeds), so they read
        position -1, a pad under right padding; and a real token equal to the pad id (GPT-2 and
        Llama-3 pad with EOS) or a config without a pad id defeats the search too. The mask knows,
        whatever the padding side."""
        labels = batch.get("labels")
        prompted = model.inputs(**{k: v for k, v in batch.items() if k != "labels"})
        out = model.base.base_model(**prompted.kwargs, use_cache=False, **kwargs)
        hidden = out.last_hidden_state
        last = prompted.last_position().to(hidden.device)
        logits = model.base.score(hidden[torch.arange(len(last), device=hidden.device), last])
        loss = None
        if labels is not None:
            loss = model.base.loss_function(
                logits=logits, labels=labels, pooled_logits=logits, config=model.base.config
            )
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def counter(self, labels) -> Counter:
        return ClassCounts(len(labels))

    # ---- serving ----------------------------------------------------------------------------------
    def head(self, base, tensors, labels):
        return SequenceHead(base, tensors, len(labels))

    def predict_input(self, text) -> tuple[list, dict, None]:
        """(what to tokenize, tokenizer options, words) of one input to classify."""
        if not isinstance(text, str):
            raise BadInput("seq-cls classifies a text, not a list of words")
        if not text.strip():
            raise BadInput("empty input: seq-cls needs a non-empty text")
        return [text], {}, None

    def result(self, row, logits: torch.Tensor, labels: list[str]) -> dict:
        """{"label", "score", "scores"}, as `ptv2 predict` answers."""
        return label_scores(logits.float().softmax(-1).cpu(), labels)


def label_scores(probs: torch.Tensor, names: Sequence[str]) -> dict:
    """A seq-cls result from one row of class probabilities: the best label, its score, all scores."""
    best = int(probs.argmax())
    return {"label": names[best], "score": float(probs[best]), "scores": dict(zip(names, probs.tolist(), strict=True))}


class ClassCounts(Counter):
    """Loss, accuracy and per-class true positives, predictions and gold counts (macro F1)."""

    def __init__(self, n_labels: int) -> None:
        self.n, self.size = n_labels, 4 + 3 * n_labels

    def count(self, forward, inputs, gold, valid):
        logits = forward(**inputs).logits.float().cpu()  # [batch, labels]: small
        loss = F.cross_entropy(logits, gold, reduction="none")
        pred = logits.argmax(-1)
        tp = [((pred == c) & (gold == c) & valid).sum() for c in range(self.n)]
        predicted = [((pred == c) & valid).sum() for c in range(self.n)]
        actual = [((gold == c) & valid).sum() for c in range(self.n)]
        head = [loss[valid].sum(), valid.sum(), (pred == gold)[valid].sum(), valid.sum()]
        return torch.tensor([float(x) for x in head + tp + predicted + actual], dtype=torch.float64)

    def metrics(self, sums):
        n = self.n
        tp, predicted, actual = sums[4 : 4 + n], sums[4 + n : 4 + 2 * n], sums[4 + 2 * n :]
        f1 = [2 * t / (p + a) if p + a else 0.0 for t, p, a in zip(tp, predicted, actual, strict=True)]
        return {"loss": sums[0] / max(sums[1], 1), "accuracy": sums[2] / max(sums[3], 1), "macro_f1": sum(f1) / n}


class SequenceHead:
    """A served seq-cls prompt's head: one label per input, from its first input position
    (encoders: BERT's pooler, RoBERTa's head read it) or its last real token (decoders)."""

    def __init__(self, base, tensors: dict[str, torch.Tensor], num_labels: int) -> None:
        t = base.head_template(SequenceClassification.name, num_labels)
        self.name = t.name  # the head module's name in the task class ("classifier", "score")
        self.decoder = base.geometry.is_decoder
        own = split_prefix(tensors, f"{t.name}.")
        self.module = own_module(t.module, own)
        pooler_prefix = f"{base.model.base_model_prefix}.pooler."
        pooler = split_prefix(tensors, pooler_prefix)
        self.pooler, self.own_pooler = None, bool(pooler)
        if t.uses_pooler:
            shared = getattr(base.body, "pooler", None)
            if shared is None:
                raise ArtifactError(f"seq-cls on {base.geometry.model_type} needs the pooler the served base lacks")
            # a pooler the prompt trained (its checkpoint had none) is the prompt's own; the base's is only read
            self.pooler = own_module(shared, pooler) if pooler else shared
        used = {f"{t.name}.{k}" for k in own} | {pooler_prefix + k for k in pooler}
        refuse_other_tensors(tensors, used, SequenceClassification.name)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules this prompt owns (what its weights are)."""
        return {"head": self.module, **({"pooler": self.pooler} if self.own_pooler else {})}

    def logits(self, hidden: torch.Tensor, batch, rows: list[int]) -> list[torch.Tensor]:
        where = batch.last_position() if self.decoder else batch.first_position()
        x = hidden[rows, where[rows].to(hidden.device)]  # [n, hidden]
        if self.pooler is not None:  # BERT: pooler (reads position 0 of a sequence) -> classifier
            out = self.module(self.pooler(x[:, None]))
        elif not self.decoder:  # RoBERTa's classification head reads position 0 itself
            out = self.module(x[:, None])
        else:
            out = self.module(x)
        return list(out)
