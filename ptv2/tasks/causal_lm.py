"""causal-lm: a prompt (laid out by the spec's template) and a response; the loss is on the
response tokens (and EOS) only, with the LM head applied only where a label is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ptv2.errors import ArtifactError
from ptv2.tasks.base import IGNORE_INDEX, Counter, Task, blank, refuse_other_tensors


@dataclass
class LabelledTokenStats(ModelOutput):
    """Sums over the labelled next tokens of a causal-LM batch (the forward with
    `labelled_stats=True`); a ModelOutput, so DeepSpeed's engine passes it through."""

    loss_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    correct: torch.Tensor | None = None


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


class CausalLM(Task):
    name = "causal-lm"
    auto_class_name = "AutoModelForCausalLM"
    labelled = False
    generates = True
    peft_task_type = "CAUSAL_LM"
    packs = True
    primary = ("loss", "min")
    metrics = {"loss": "min", "accuracy": "max", "perplexity": "min"}

    def columns(self, data) -> list[str]:
        return [data.prompt_column, data.response_column]

    def target_column(self, data) -> str:
        return data.response_column

    def encode(self, batch: dict, data, labels, tokenizer) -> dict:
        prompts, responses = batch[data.prompt_column], batch[data.response_column]
        errors = [
            "empty prompt" if blank(p) else "missing response" if r is None else "empty response" if blank(r) else ""
            for p, r in zip(prompts, responses, strict=True)
        ]
        ok = [not e for e in errors]
        p_ids = tokenizer(
            [data.prompt_template.replace("{prompt}", p) if good else "" for p, good in zip(prompts, ok, strict=True)],
            add_special_tokens=True,
        )["input_ids"]
        r_ids = tokenizer([r if good else "" for r, good in zip(responses, ok, strict=True)], add_special_tokens=False)[
            "input_ids"
        ]
        eos = tokenizer.eos_token_id
        rows = [join_generation(p, r, eos, data.max_length) for p, r in zip(p_ids, r_ids, strict=True)]
        for i, r in enumerate(r_ids):  # an EOS alone would teach nothing but stopping
            if ok[i] and not r:
                errors[i] = "the response tokenizes to no tokens (is the tokenizer right for this text?)"
        return {**{k: [row[k] for row in rows] for k in ("input_ids", "attention_mask", "labels")}, "_error": errors}

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        # decoder-only: labels are as long as the inputs, padded the same way
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # next-token targets

    # ---- the model -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor], labelled_stats: bool = False, **kwargs):
        """HF's output with the prompt in place, one logits row per token. In training with labels,
        the loss alone (`response_loss`); `labelled_stats`: evaluation sums instead."""
        if labelled_stats:
            return self.labelled_stats(model, batch)
        if batch.get("labels") is not None and model.training and not kwargs:
            return self.response_loss(model, batch)
        prompted = model.inputs(**batch)
        out = model.base(**prompted.kwargs, use_cache=False, **kwargs)
        if prompted.soft:
            out.logits = out.logits[:, prompted.soft :]  # callers see one row per token
        return out

    def labelled_logits(self, model, batch: dict[str, torch.Tensor]):
        """Next-token logits [N, vocab] at the N positions whose next token has a label, and those
        labels [N]: the LM head is applied there only."""
        if batch.get("labels") is None:
            raise ValueError("labelled-token logits need labels")
        prompted = model.inputs(**batch)
        labels = prompted.kwargs.pop("labels")
        hidden = model.base.base_model(**prompted.kwargs, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        return model.base.get_output_embeddings()(hidden[:, :-1][keep]), target[keep]

    def response_loss(self, model, batch: dict[str, torch.Tensor]) -> CausalLMOutputWithPast:
        """Training loss with the LM head applied only where a label exists: supervised prompts put
        the loss on the response alone, so projecting every prompt position onto the vocabulary (the
        largest matrix of a small model) is wasted work; equals HF's mean over labelled next tokens."""
        logits, target = self.labelled_logits(model, batch)
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / max(len(target), 1)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def labelled_stats(self, model, batch: dict[str, torch.Tensor]) -> LabelledTokenStats:
        """Evaluation sums over the labelled next tokens, on the model's device: a full
        [batch, length, vocab] logits tensor (~1 GB per batch at a 128k vocabulary) is never built,
        nor copied to the CPU."""
        logits, target = self.labelled_logits(model, batch)
        logits = logits.float()
        return LabelledTokenStats(
            loss_sum=F.cross_entropy(logits, target, reduction="sum"),
            count=torch.tensor(len(target), device=target.device),
            correct=(logits.argmax(-1) == target).sum(),
        )

    def counter(self, labels=None) -> Counter:
        return NextTokenCounts()

    # ---- serving ----------------------------------------------------------------------------------
    def head(self, base, tensors, labels):
        if base.lm_head is None:
            raise ArtifactError("a causal-lm prompt needs a decoder with an LM head; the served base has none")
        refuse_other_tensors(tensors, set(), self.name)
        return None


class NextTokenCounts(Counter):
    """Loss and accuracy over the labelled next tokens (the response), summed on the device."""

    size = 3  # loss sum, labelled tokens, correct argmax

    def count(self, forward, inputs, gold, valid):
        device = inputs["input_ids"].device
        gold = gold.masked_fill(~valid[:, None], IGNORE_INDEX).to(device)  # padded repeats do not count
        stats = forward(**inputs, labels=gold, labelled_stats=True)
        return torch.tensor([float(stats.loss_sum), int(stats.count), int(stats.correct)], dtype=torch.float64)

    def metrics(self, sums):
        loss = sums[0] / max(sums[1], 1)
        return {"loss": loss, "accuracy": sums[2] / max(sums[1], 1), "perplexity": float(torch.tensor(loss).exp())}
