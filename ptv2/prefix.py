"""Prompt modules: the deep prefix of P-Tuning v2 and the shallow input prompt of Lester et al.

Everything here is sized from the base model's config (`Geometry`), never from `hidden_size`
alone: keys/values are `num_key_value_heads × head_dim` wide (grouped-query attention).

The deep prefix produces one flat row per prefix position, in the layout THUDM's code and PEFT
use: the last dimension is ordered (layer, key|value, kv_head, head_dim). `fold()` turns either
variant (plain or MLP-reparameterized) into that plain tensor, which is all inference needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

Method = Literal["ptv2", "prompt-tuning"]
Init = Literal["normal", "vocab", "text"]

# model_type -> "decoder" (causal self-attention) or "encoder" (bidirectional).
# Each entry is covered by tests/test_prefix_attention.py; anything else is refused, because a
# prefix silently ignored (or mis-sized) by an untested attention implementation trains nothing.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "decoder",
    "qwen2": "decoder",
    "mistral": "decoder",
    "gpt2": "decoder",
    "bert": "encoder",
    "roberta": "encoder",
}


class UnsupportedModelError(ValueError):
    pass


class PromptConfig(BaseModel):
    """What to train. `length` 0 means no prompt at all (head only: a linear probe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field("ptv2", description="ptv2: deep prefix at every layer; prompt-tuning: input embeddings only")
    length: int = Field(16, ge=0, le=4096, description="number of prompt positions (0: no prompt, head only)")
    projection: int | None = Field(
        None, gt=0, le=65536, description="hidden size of the reparameterization MLP; null for a plain table"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the prompt during training")
    init: Init | None = Field(
        None,
        description="how the prompt starts: normal = N(0,1) rows (THUDM, PEFT); vocab = what the frozen model "
        "makes of P random vocabulary tokens (their keys/values at every layer for ptv2, their embeddings for "
        "prompt-tuning: Lester et al.); text = the same for the first P tokens of the training data "
        "(Li & Liang's real-word activations). Default: vocab, except normal for ptv2 on encoders "
        "and with a projection",
    )

    @model_validator(mode="after")
    def _init_needs_plain_table(self) -> PromptConfig:
        if self.init in ("vocab", "text") and self.projection:
            raise ValueError(
                f"init {self.init!r} sets the prompt rows directly, which the MLP reparameterization "
                "(projection) has not got: use init normal or projection null"
            )
        return self

    def resolved_init(self, kind: str) -> str:
        """The init used on a base model of `kind` ("decoder"/"encoder") when none is set: vocab
        for prompt tuning (Lester) and for deep prefixes on decoders (N(0,1) keys/values perturb
        every layer of a pretrained decoder: benchmarks/QUALITY.md), normal for deep prefixes
        on encoders (THUDM's setting, where the paper's results come from)."""
        if self.init is not None:
            return self.init
        if self.projection:
            return "normal"
        return "vocab" if self.method == "prompt-tuning" or kind == "decoder" else "normal"

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a base model, as far as a prefix is concerned."""

    model_type: str
    kind: str  # "decoder" | "encoder"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int | None
    position_offset: int  # RoBERTa numbers positions from padding_idx + 1

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def of(cls, config) -> Geometry:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported by ptv2 "
                f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
            )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        offset = (config.pad_token_id + 1) if model_type == "roberta" else 0
        max_pos = getattr(config, "max_position_embeddings", None)
        return cls(
            model_type=model_type,
            kind=SUPPORTED_MODEL_TYPES[model_type],
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            max_positions=None if max_pos is None else max_pos - offset,
            position_offset=offset,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class _Reparameterized(nn.Module):
    """`length` trainable rows of width `out`, optionally produced by an MLP (THUDM's
    `prefix_projection`): Embedding(P, hidden) -> Linear -> Tanh -> Linear(out)."""

    def __init__(self, length: int, out: int, hidden: int, projection: int | None) -> None:
        super().__init__()
        self.length = length
        # A buffer, not an arange per call: modules are called (never their .weight read
        # directly) so DeepSpeed ZeRO-3 gathers the partitioned parameters in its hooks.
        self.register_buffer("positions", torch.arange(length), persistent=False)
        if projection:
            self.embedding = nn.Embedding(length, hidden)
            self.mlp: nn.Module | None = nn.Sequential(
                nn.Linear(hidden, projection), nn.Tanh(), nn.Linear(projection, out)
            )
        else:
            self.embedding = nn.Embedding(length, out)
            self.mlp = None

    def rows(self) -> torch.Tensor:
        # under ZeRO-3 the buffer may stay on CPU while the (partitioned) weight lives on the GPU
        x = self.embedding(self.positions.to(self.embedding.weight.device))
        return self.mlp(x) if self.mlp is not None else x


class PrefixEncoder(_Reparameterized):
    """P-Tuning v2: key/value prefixes for every layer."""

    def __init__(self, config: PromptConfig, geometry: Geometry) -> None:
        out = geometry.num_layers * 2 * geometry.kv_width
        super().__init__(config.length, out, geometry.hidden_size, config.projection)
        self.geometry = geometry
        self.dropout = nn.Dropout(config.dropout)

    def forward(self) -> torch.Tensor:
        """[layers, 2, kv_heads, P, head_dim]: per layer, the key (0) and value (1) prefix."""
        return self.unflatten(self.dropout(self.rows()))

    def unflatten(self, rows: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return rows.view(self.length, g.num_layers, 2, g.num_kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def init_from_kv(self, kv: torch.Tensor) -> None:
        """Set the (plain) table to an explicit prefix [layers, 2, kv_heads, P, head_dim]."""
        from ptv2.distributed import gathered

        rows = kv.permute(3, 0, 1, 2, 4).reshape(self.length, -1)
        with gathered([self.embedding.weight], modifier_rank=0):
            self.embedding.weight.copy_(rows.to(self.embedding.weight))

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        """The plain [P, layers·2·kv_width] tensor that reproduces this encoder at inference."""
        return self.rows().detach().clone()


class PromptEmbedding(_Reparameterized):
    """Lester et al. prompt tuning: P trainable input embeddings, prepended to the tokens."""

    def __init__(self, config: PromptConfig, geometry: Geometry) -> None:
        super().__init__(config.length, geometry.hidden_size, geometry.hidden_size, config.projection)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self) -> torch.Tensor:
        """[P, hidden]"""
        return self.dropout(self.rows())

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        return self.rows().detach().clone()

    @torch.no_grad()
    def init_from_tokens(self, embeddings: nn.Embedding, ids: torch.Tensor) -> None:
        """Start from the input embeddings of real tokens `ids` [P] (Lester et al.'s best
        initialisation); only for the plain variant, where the rows are the parameters."""
        from ptv2.distributed import gathered

        # under ZeRO-3 both tables are partitioned: gather, write on rank 0, re-partition
        with gathered([embeddings.weight, self.embedding.weight], modifier_rank=0):
            ids = ids.to(embeddings.weight.device)
            self.embedding.weight.copy_(embeddings.weight[ids].to(self.embedding.weight))


def build_prompt_module(config: PromptConfig, geometry: Geometry) -> PrefixEncoder | PromptEmbedding | None:
    if config.length == 0:
        return None
    if config.method == "ptv2":
        return PrefixEncoder(config, geometry)
    return PromptEmbedding(config, geometry)


def count_prompt_parameters(config: PromptConfig, geometry: Geometry, folded: bool) -> int:
    """Number of prompt values: trainable (with the MLP) or folded (what inference keeps)."""
    if config.length == 0:
        return 0
    width = geometry.num_layers * 2 * geometry.kv_width if config.method == "ptv2" else geometry.hidden_size
    if folded or not config.projection:
        return config.length * width
    h, p = geometry.hidden_size, config.projection
    return config.length * h + (h * p + p) + (p * width + width)
