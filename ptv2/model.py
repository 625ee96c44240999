"""A frozen transformers model plus a trainable prompt (and task head): `PromptedModel`.

The prompt enters the model one way (`ptv2.prompt.prompt_inputs`): P-Tuning v2's keys/values
through the installed transformers' Cache API (a fresh cache pre-filled with one prefix per layer
on every forward, so the frozen attention attends over `[prefix ; tokens]` and gradients flow
back into the prefix), Lester et al.'s embeddings in front of the input embeddings. What the
model computes with it is the task's (`ptv2.tasks`): the response-only loss of a causal LM, a
decoder classifier reading its last real token, per-token logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from ptv2.geometry import Geometry
from ptv2.prompt import PromptedBatch, make_prompt, prompt_inputs
from ptv2.settings import PromptConfig
from ptv2.tasks import Task, task_of

# Task heads the transformers classes create (BERT/RoBERTa: classifier; decoders: score).
HEAD_MODULES = ("classifier", "score")
# what a batch may hold besides input_ids and attention_mask
BATCH_KEYS = ("labels", "token_type_ids", "segment_ids", "segment_positions")


def cache_argument(model: PreTrainedModel) -> str:
    """The forward argument that takes a cache: transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns until 5.40). Task classes may only forward **kwargs, so the inner
    model's signature decides."""
    outer = inspect.signature(model.forward).parameters
    inner = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in outer or "cache" in inner else "past_key_values"


def load_base_model(
    name_or_path: str | Path,
    task: str | Task,
    labels: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **kwargs,
) -> tuple[PreTrainedModel, list[str]]:
    """Load a pretrained model for `task` and return it with the names of the parameters that
    the checkpoint did not contain (a new task head, or any other freshly initialised part):
    those must be trained, everything else stays frozen."""
    task = task_of(task)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **task.label_kwargs(labels))
    Geometry.of(config)  # refuse unsupported architectures before loading any weight
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from ptv2 import loading  # DeepSpeed: only where ZeRO-3 is on

    mapping = task.auto_class._model_mapping  # config class -> model class, as from_config uses it
    if is_deepspeed_zero3_enabled() and loading.supported(deepspeed_config()) and type(config) in mapping:
        loaded = loading.load_zero3(mapping[type(config)], name_or_path, config, dtype, HEAD_MODULES)
        if loaded is not None:
            return loaded
    model, info = task.auto_class.from_pretrained(
        name_or_path,
        config=config,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **kwargs,
    )
    return model, sorted(info.get("missing_keys", []))


def build_from_config(config, task: str | Task, labels: Sequence[str] | None = None) -> PreTrainedModel:
    """A randomly initialised model of `config` for `task` (tests, benchmarks)."""
    task = task_of(task)
    for key, value in task.label_kwargs(labels).items():
        setattr(config, key, value)
    Geometry.of(config)
    return task.auto_class.from_config(config)


def head_parameter_names(base: PreTrainedModel, extra: Sequence[str] = ()) -> list[str]:
    """Parameters trained with the prompt: the task head plus anything the checkpoint lacked."""
    extra = set(extra)
    return [n for n, _ in base.named_parameters() if n.split(".", 1)[0] in HEAD_MODULES or n in extra]


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


class PromptedModel(nn.Module):
    """`base` (frozen) + a trainable prompt + an optional trainable task head."""

    def __init__(
        self,
        base: PreTrainedModel,
        prompt: PromptConfig,
        task: str | Task,
        trainable_head: Sequence[str] | None = None,
        init_vocab: int | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """`init_vocab`: the token ids init "vocab" draws from: a vocabulary size (ids below it),
        the allowed ids themselves (`vocab_init_ids(tokenizer)`: the tokenizer's vocabulary less
        its special tokens), or None for `config.vocab_size`. Always capped by the embedding rows,
        which checkpoints often pad beyond the vocabulary (rows no token uses)."""
        super().__init__()
        self.task = task_of(task)
        self.base = base
        self.prompt_config = prompt
        self.geometry = g = Geometry.of(base.config)
        if g.max_positions is not None and prompt.length >= g.max_positions:
            raise ValueError(
                f"prompt length {prompt.length} leaves no room for text: {g.model_type} allows "
                f"{g.max_positions} positions"
            )
        self.prompt = make_prompt(prompt, g)
        # how the training data was laid out, for inference (set by load_prompt from the manifest)
        self.prompt_template: str | None = None
        self.max_length: int | None = None
        self.head_names = list(trainable_head if trainable_head is not None else head_parameter_names(base))
        heads = set(self.head_names)
        for name, param in base.named_parameters():
            param.requires_grad_(name in heads)
        self.cache_kwarg = cache_argument(base)
        if self.prompt.input_length and "inputs_embeds" not in inspect.signature(base.forward).parameters:
            raise ValueError(f"{type(base).__name__} takes no inputs_embeds: prompt-tuning needs them")
        if prompt.length and prompt.resolved_init(g.kind) == "vocab":
            allowed = _init_vocab(base, init_vocab)
            # every rank draws the same ids (the loop seeds all ranks alike)
            self.init_prompt_from_tokens(allowed[torch.randint(0, len(allowed), (prompt.length,))])
        # init "text" needs the training data: the loop calls init_prompt_from_tokens itself

    @torch.no_grad()
    def init_prompt_from_tokens(self, ids: torch.Tensor) -> None:
        """Start the prompt from what the frozen model makes of `ids` [P]: their input embeddings
        (prompt tuning) or the keys/values every layer computes for them at positions 0..P-1
        (P-Tuning v2), so the untrained prompt acts as if that text preceded every input."""
        if ids.shape != (self.prompt.length,):
            raise ValueError(f"need {self.prompt.length} token ids to initialise the prompt, got {tuple(ids.shape)}")
        self.prompt.init_from_tokens(self.base, ids, self.cache_kwarg)

    # ---- what is trained -------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def head_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.base.named_parameters())
        return {name: params[name] for name in self.head_names}

    @property
    def prompt_length(self) -> int:
        return self.prompt.length

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the base model's layers, transformers' own: each layer keeps
        its input and is recomputed in the backward. Non-reentrant, so the prefix, which reaches
        every layer inside the cache rather than as an argument, still gets its gradient; the
        layers may keep the cache because `inputs` hands them a PrefixCache, which a replay reads
        alike. Model-level flags stay off: GPT-2's model drops the cache itself when it is set."""
        self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for module in self.base.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
            elif getattr(module, "gradient_checkpointing", False):
                module.gradient_checkpointing = False

    # ---- the prompt in place ----------------------------------------------------------------
    def inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        segment_positions: torch.Tensor | None = None,
        cache: str = "replayable",
    ) -> PromptedBatch:
        """The base model's keyword arguments that carry the prompt (`ptv2.prompt.prompt_inputs`;
        `segment_ids`, `segment_positions`: a packed batch, `ptv2.packing`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return prompt_inputs(
            self.prompt,
            input_ids,
            attention_mask,
            embed=self.base.get_input_embeddings(),
            geometry=self.geometry,
            cache_config=self.base.config if self.geometry.is_decoder else None,  # BERT builds its own layers
            cache_kwarg=self.cache_kwarg,
            dtype=self.base.dtype,
            token_type_ids=token_type_ids,
            labels=labels,
            segment_ids=segment_ids,
            segment_positions=segment_positions,
            cache=cache,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """The task's output with the prompt in place (see `ptv2.tasks`). Tensors among `kwargs`
        are the batch's (`labels`, `token_type_ids`, a packed batch's segments); causal LMs also
        take `labelled_stats=True`: evaluation sums over the labelled next tokens."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update({k: kwargs.pop(k) for k in BATCH_KEYS if k in kwargs})
        if batch["attention_mask"] is None:
            batch["attention_mask"] = torch.ones_like(input_ids)
        batch = {k: v for k, v in batch.items() if v is not None}
        return self.task.forward(self, batch, **kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **gen_kwargs
    ) -> torch.Tensor:
        """Greedy/sampled continuation with the prompt (transformers' generate); returns the new
        tokens only. Pad on the left for batches of different lengths."""
        if not self.task.generates:
            raise ValueError(f"generate needs a causal-lm prompt, this one is for {self.task}")
        batch = self.inputs(input_ids, attention_mask, cache="growing")
        kwargs = batch.kwargs
        kwargs.pop("position_ids")  # transformers numbers them from the mask: the same convention
        if not batch.kv:
            kwargs.pop(self.cache_kwarg)
        out = self.base.generate(**kwargs, **gen_kwargs)
        return out[:, input_ids.shape[1] :] if "input_ids" in kwargs else out  # from embeddings: new tokens only
