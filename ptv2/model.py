"""A frozen transformers model plus a trainable prompt (and task head): `PromptedModel`.

P-Tuning v2 injects the prefix through the installed transformers' Cache API: a fresh
`DynamicCache` pre-filled with one key/value prefix per layer is built on every forward, so the
frozen attention attends over `[prefix ; tokens]` and gradients flow back into the prefix.
Position ids follow the single convention HF, PEFT and THUDM use: with a prefix of P, real tokens
are numbered from P (left padding is taken into account). Prompt tuning (Lester et al.) instead
prepends P trainable vectors to the input embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DynamicCache,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.utils import ModelOutput

from ptv2.prefix import (
    Geometry,
    PrefixEncoder,
    PromptConfig,
    PromptEmbedding,
    build_prompt_module,
)

TASKS: tuple[str, ...] = ("causal-lm", "seq-cls", "token-cls")
AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
}
# Task heads the transformers classes create (BERT/RoBERTa: classifier; decoders: score).
HEAD_MODULES = ("classifier", "score")
IGNORE_INDEX = -100


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")


def _label_kwargs(task: str, labels: Sequence[str] | None) -> dict:
    if task == "causal-lm":
        if labels:
            raise ValueError("labels are only for seq-cls and token-cls tasks, not causal-lm")
        return {}
    if not labels or len(labels) < 2:
        raise ValueError(f"task {task} needs at least 2 label names, got {list(labels or [])}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be unique, got {list(labels)}")
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def load_base_model(
    name_or_path: str | Path,
    task: str,
    labels: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **kwargs,
) -> tuple[PreTrainedModel, list[str]]:
    """Load a pretrained model for `task` and return it with the names of the parameters that
    the checkpoint did not contain (a new task head, or any other freshly initialised part):
    those must be trained, everything else stays frozen."""
    check_task(task)
    config = AutoConfig.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, **_label_kwargs(task, labels)
    )
    Geometry.of(config)  # refuse unsupported architectures before loading any weight
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from ptv2 import loading

    mapping = AUTO_CLASSES[task]._model_mapping  # config class -> model class, as from_config uses it
    if is_deepspeed_zero3_enabled() and loading.supported(deepspeed_config()) and type(config) in mapping:
        loaded = loading.load_zero3(mapping[type(config)], name_or_path, config, dtype, HEAD_MODULES)
        if loaded is not None:
            return loaded
    model, info = AUTO_CLASSES[task].from_pretrained(
        name_or_path,
        config=config,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **kwargs,
    )
    return model, sorted(info.get("missing_keys", []))


def build_from_config(config, task: str, labels: Sequence[str] | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config` for `task` (tests, benchmarks)."""
    check_task(task)
    for key, value in _label_kwargs(task, labels).items():
        setattr(config, key, value)
    Geometry.of(config)
    return AUTO_CLASSES[task].from_config(config)


def head_parameter_names(base: PreTrainedModel, extra: Sequence[str] = ()) -> list[str]:
    """Parameters trained with the prompt: the task head plus anything the checkpoint lacked."""
    extra = set(extra)
    names = []
    for name, _ in base.named_parameters():
        top = name.split(".", 1)[0]
        if top in HEAD_MODULES or name in extra:
            names.append(name)
    return names


@dataclass
class LabelledTokenStats(ModelOutput):
    """Sums over the labelled next tokens of a causal-LM batch (PromptedModel.forward with
    `labelled_stats=True`); a ModelOutput, so DeepSpeed's engine passes it through."""

    loss_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    correct: torch.Tensor | None = None


def vocab_init_ids(tokenizer) -> torch.Tensor:
    """The ids init "vocab" should draw from: every token of `tokenizer` but its special ones
    (padding, BOS/EOS, chat markers carry no meaning a prompt should start from)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    ids = torch.arange(len(tokenizer))
    return ids[~torch.isin(ids, special)]


def _init_vocab(base: PreTrainedModel, vocab: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    rows = base.get_input_embeddings().num_embeddings
    if vocab is None:
        vocab = getattr(base.config, "vocab_size", None) or rows
    if isinstance(vocab, int):
        return torch.arange(min(vocab, rows))
    ids = torch.as_tensor(vocab, dtype=torch.long).flatten()
    if ids.numel() and ids.min() < 0:
        raise ValueError(f"init_vocab holds a negative token id ({int(ids.min())})")
    ids = ids[ids < rows]  # a token without an embedding row cannot start a prompt
    if ids.numel() == 0:
        raise ValueError(f"init_vocab holds no token id below the {rows} embedding rows to initialise the prompt from")
    return ids


class PrefixCache(DynamicCache):
    """The prefix as a cache that one forward reads and never grows: each layer's update returns
    [prefix ; new keys/values] and keeps only the prefix. A forward can then be replayed, which is
    what activation checkpointing does to every layer in the backward (a growing cache would hold
    the tokens twice by then, so transformers' checkpointed layers drop any other cache)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class PromptedModel(nn.Module):
    """`base` (frozen) + a trainable prompt + an optional trainable task head."""

    def __init__(
        self,
        base: PreTrainedModel,
        prompt: PromptConfig,
        task: str,
        trainable_head: Sequence[str] | None = None,
        train_base: bool = False,
        init_vocab: int | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """`init_vocab`: the token ids init "vocab" draws from: a vocabulary size (ids below it),
        the allowed ids themselves (`vocab_init_ids(tokenizer)`: the tokenizer's vocabulary less
        its special tokens), or None for `config.vocab_size`. Always capped by the embedding rows,
        which checkpoints often pad beyond the vocabulary (rows no token uses)."""
        super().__init__()
        check_task(task)
        self.base = base
        self.task = task
        self.prompt_config = prompt
        self.geometry = Geometry.of(base.config)
        g = self.geometry
        if g.max_positions is not None and prompt.length >= g.max_positions:
            raise ValueError(
                f"prompt length {prompt.length} leaves no room for text: {g.model_type} allows "
                f"{g.max_positions} positions"
            )
        self.prompt = build_prompt_module(prompt, g)
        # how the training data was laid out, for inference (set by load_prompt from the manifest)
        self.prompt_template: str | None = None
        self.max_length: int | None = None
        self.head_names = list(trainable_head if trainable_head is not None else head_parameter_names(base))
        heads = set(self.head_names)
        # Full fine-tuning (`train_base`) exists only as a baseline for the quality benchmark.
        for name, param in base.named_parameters():
            param.requires_grad_(train_base or name in heads)
        params = inspect.signature(base.forward).parameters
        # transformers 5.24 renamed `past_key_values` -> `cache` (old name warns until 5.40). Task
        # classes may only forward **kwargs, so the inner model's signature decides.
        inner = inspect.signature(base.base_model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params or "cache" in inner else "past_key_values"
        if isinstance(self.prompt, PromptEmbedding) and "inputs_embeds" not in params:
            raise ValueError(f"{type(base).__name__} takes no inputs_embeds: prompt-tuning needs them")
        if self.prompt is not None and prompt.resolved_init(g.kind) == "vocab":
            allowed = _init_vocab(base, init_vocab)
            # every rank draws the same ids (the loop seeds all ranks alike)
            self.init_prompt_from_tokens(allowed[torch.randint(0, len(allowed), (prompt.length,))])
        # init "text" needs the training data: the loop calls init_prompt_from_tokens itself

    @torch.no_grad()
    def init_prompt_from_tokens(self, ids: torch.Tensor) -> None:
        """Start the prompt from what the frozen model makes of `ids` [P]: their input embeddings
        (prompt tuning) or the keys/values every layer computes for them at positions 0..P-1
        (P-Tuning v2), so the untrained prompt acts as if that text preceded every input. Under
        ZeRO-3 the base model runs layer by layer gathered; collective then (same ids on every rank)."""
        from ptv2.distributed import gathered_per_module

        if ids.shape != (self.prompt_length,):
            raise ValueError(f"need {self.prompt_length} token ids to initialise the prompt, got {tuple(ids.shape)}")
        if isinstance(self.prompt, PromptEmbedding):
            self.prompt.init_from_tokens(self.base.get_input_embeddings(), ids)
            return
        inner = self.base.base_model
        cache = DynamicCache(config=self.base.config if self.geometry.kind == "decoder" else None)
        device = next(inner.parameters()).device
        with gathered_per_module(inner):
            inner(input_ids=ids[None].to(device), use_cache=True, **{self.cache_kwarg: cache})
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        self.prompt.init_from_kv(kv.float())

    # ---- what is trained -------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def head_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.base.named_parameters())
        return {name: params[name] for name in self.head_names}

    @property
    def prompt_length(self) -> int:
        return self.prompt_config.length if self.prompt is not None else 0

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the base model's layers, transformers' own: each layer keeps
        its input and is recomputed in the backward. Non-reentrant, so the prefix, which reaches
        every layer inside the cache rather than as an argument, still gets its gradient; the
        layers may keep the cache because `prepare` hands them a PrefixCache, which a replay reads
        alike. Model-level flags stay off: GPT-2's model drops the cache itself when it is set."""
        self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for module in self.base.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
            elif getattr(module, "gradient_checkpointing", False):
                module.gradient_checkpointing = False

    # ---- injection -------------------------------------------------------------------------
    def prefix_cache(self, batch_size: int, dtype: torch.dtype | None = None, replayable: bool = False) -> DynamicCache:
        """A fresh cache holding the prefix of every layer, expanded to `batch_size`; `replayable`:
        a PrefixCache, which one forward reads without growing it (not for generation)."""
        assert isinstance(self.prompt, PrefixEncoder)
        kv = self.prompt()
        kv = kv.to(dtype or self.base.dtype)
        layers = [
            (
                kv[i, 0].unsqueeze(0).expand(batch_size, -1, -1, -1),
                kv[i, 1].unsqueeze(0).expand(batch_size, -1, -1, -1),
            )
            for i in range(kv.shape[0])
        ]
        # BERT-family encoders build their own cache layers from the data (config=None).
        config = self.base.config if self.geometry.kind == "decoder" else None
        return (PrefixCache if replayable else DynamicCache)(layers, config=config)

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Real tokens numbered from P, pads skipped (so left padding changes nothing)."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) + self.prompt_length
        return pos + self.geometry.position_offset

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict:
        """The keyword arguments for `base.forward` that carry the prompt."""
        batch, _ = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {k: v for k, v in (("token_type_ids", token_type_ids), ("labels", labels)) if v is not None}
        if self.prompt is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        P = self.prompt_length
        full_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
        if isinstance(self.prompt, PrefixEncoder):
            return {
                "input_ids": input_ids,
                "attention_mask": full_mask,
                "position_ids": self._positions(attention_mask),
                self.cache_kwarg: self.prefix_cache(batch, replayable=True),
                **extra,
            }
        # Prompt tuning: [prompt ; tokens] as embeddings; prompt positions 0..P-1, and the
        # per-token inputs (token types, token labels) padded over the prompt.
        embeds = self.base.get_input_embeddings()(input_ids)
        prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        prompt_pos = torch.arange(P, device=input_ids.device).expand(batch, -1) + self.geometry.position_offset
        if token_type_ids is not None:
            extra["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, P), token_type_ids], 1)
        if labels is not None and self.task in ("causal-lm", "token-cls"):
            extra["labels"] = torch.cat([labels.new_full((batch, P), IGNORE_INDEX), labels], dim=1)
        return {
            "inputs_embeds": torch.cat([prompt, embeds], dim=1),
            "attention_mask": full_mask,
            "position_ids": torch.cat([prompt_pos, self._positions(attention_mask)], dim=1),
            **extra,
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labelled_stats: bool = False,
        **kwargs,
    ):
        """HF's output with the prompt in place. `labelled_stats=True` (causal-lm, with labels;
        evaluation) returns `LabelledTokenStats` instead: loss sum, count and correct argmax over
        the labelled next tokens, with the LM head applied there only."""
        if labelled_stats:
            return self._labelled_token_stats(input_ids, attention_mask, token_type_ids, labels)
        if self.task == "causal-lm" and labels is not None and self.training and not kwargs:
            return self._response_only_loss(input_ids, attention_mask, token_type_ids, labels)
        if self.task == "seq-cls" and self.geometry.kind == "decoder":
            return self._last_token_classification(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        inputs = self.prepare(input_ids, attention_mask, token_type_ids, labels)
        out = self.base(**inputs, use_cache=False, **kwargs)
        if isinstance(self.prompt, PromptEmbedding) and self.task != "seq-cls":
            out.logits = out.logits[:, self.prompt_length :]  # callers see one row per token
        return out

    def _last_token_classification(
        self, input_ids, attention_mask, token_type_ids, labels, **kwargs
    ) -> SequenceClassifierOutputWithPast:
        """A decoder classifies from its last real token, found from the attention mask.

        HF's decoder classifiers look for the last token that is not `pad_token_id` in
        `input_ids`: with prompt tuning there are no input_ids (inputs_embeds), so they read
        position -1, a pad under right padding; and a real token equal to the pad id (GPT-2 and
        Llama-3 pad with EOS) or a config without a pad id defeats the search too. The mask
        knows, whatever the padding side."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = self.prepare(input_ids, attention_mask, token_type_ids)
        out = self.base.base_model(**inputs, use_cache=False, **kwargs)
        positions = torch.arange(length, device=attention_mask.device)
        last = (positions * attention_mask.bool()).argmax(-1)
        if isinstance(self.prompt, PromptEmbedding):
            last = last + self.prompt_length  # the hidden states include the prompt's positions
        rows = torch.arange(batch, device=last.device)
        logits = self.base.score(out.last_hidden_state[rows, last.to(out.last_hidden_state.device)])
        loss = None
        if labels is not None:
            loss = self.base.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.base.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def _labelled_logits(self, input_ids, attention_mask, token_type_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [N, vocab] at the N positions whose next token has a label, and those
        labels [N]: the LM head is applied there only."""
        if self.task != "causal-lm" or labels is None:
            raise ValueError(f"labelled-token logits need a causal-lm prompt and labels (task {self.task})")
        inputs = self.prepare(input_ids, attention_mask, token_type_ids, labels)
        labels = inputs.pop("labels")
        hidden = self.base.base_model(**inputs, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        return self.base.get_output_embeddings()(hidden[:, :-1][keep]), target[keep]

    def _response_only_loss(self, input_ids, attention_mask, token_type_ids, labels) -> CausalLMOutputWithPast:
        """Training loss of a causal LM with the LM head applied only where a label exists.

        Supervised prompts put the loss on the response alone, so projecting every prompt
        position onto the vocabulary (the largest matrix of a small model) is wasted work; the
        loss equals HF's (mean cross-entropy over labelled next tokens)."""
        logits, target = self._labelled_logits(input_ids, attention_mask, token_type_ids, labels)
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / max(len(target), 1)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def _labelled_token_stats(self, input_ids, attention_mask, token_type_ids, labels) -> LabelledTokenStats:
        """Evaluation sums over the labelled next tokens, on the model's device: a full
        [batch, length, vocab] logits tensor (~1 GB per batch at a 128k vocabulary) is never
        built, nor copied to the CPU."""
        logits, target = self._labelled_logits(input_ids, attention_mask, token_type_ids, labels)
        logits = logits.float()
        return LabelledTokenStats(
            loss_sum=F.cross_entropy(logits, target, reduction="sum"),
            count=torch.tensor(len(target), device=target.device),
            correct=(logits.argmax(-1) == target).sum(),
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **gen_kwargs
    ) -> torch.Tensor:
        """Greedy/sampled continuation with the prompt; returns the new tokens only.
        Pad on the left for batches of different lengths."""
        if self.task != "causal-lm":
            raise ValueError(f"generate needs a causal-lm prompt, this one is for {self.task}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, length = input_ids.shape
        if self.prompt is None:
            out = self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            return out[:, length:]
        full_mask = torch.cat([attention_mask.new_ones(batch, self.prompt_length), attention_mask], 1)
        if isinstance(self.prompt, PrefixEncoder):
            # HF numbers positions by the mask's cumsum, so the prefix ones give our convention.
            out = self.base.generate(
                input_ids=input_ids,
                attention_mask=full_mask,
                **{self.cache_kwarg: self.prefix_cache(batch)},
                **gen_kwargs,
            )
            return out[:, length:]
        inputs = self.prepare(input_ids, attention_mask)
        return self.base.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=full_mask, **gen_kwargs)
