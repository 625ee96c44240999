"""The attention shape of a base model, as far as a prompt is concerned, and which models ptv2
supports.

Everything is sized from the model's config, never from `hidden_size` alone: keys/values are
`num_key_value_heads × head_dim` wide (grouped-query attention), with `config.head_dim` where the
config has one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

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
