"""The prompt, and the one way it enters a frozen model.

A prompt is one of three kinds; nothing outside this module asks which:

    DeepPrefix   P keys/values in front of every layer's attention (P-Tuning v2)
    SoftPrompt   P input embeddings in front of the tokens (Lester et al.'s prompt tuning)
    NoPrompt     nothing (a linear probe: the task head alone)

Each says how many positions it puts in front of every layer's cache (`kv_length`) and of the
input (`input_length`), and gives them (`keys_values()`, `embeddings()`). The deep prefix keeps
one flat row per prefix position in the layout THUDM's code and PEFT use (the last dimension
ordered layer, key|value, kv_head, head_dim); `fold()` turns a table or its MLP
reparameterization into that plain tensor, which is all inference needs. Training, generation,
the classifiers and the serving batcher build a prompt of the same classes: served prompts hold
their folded table.

`prompt_inputs` lays a batch out for the frozen model. Rows may each have their own prompt (a
served batch) or share one (training: nothing is copied then). Per row:

    cache  [ pad … | its prefix keys/values ]                  up to the batch's longest prefix
    input  [ pad … | its soft prompt | its tokens, as given ]  up to the batch's longest soft prompt

The attention mask hides the pads. Positions follow the convention HF, PEFT and THUDM's code
share: real tokens are numbered from the row's prefix length (pads skipped, so padding on either
side changes nothing), soft-prompt positions come right before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ptv2.distributed import gathered, gathered_per_module
from ptv2.geometry import Geometry
from ptv2.packing import segment_mask
from ptv2.settings import PromptConfig
from ptv2.tasks import IGNORE_INDEX


class PrefixCache(DynamicCache):
    """The prefix as a cache that one forward reads and never grows: each layer's update returns
    [prefix ; new keys/values] and keeps only the prefix. A forward can then be replayed, which is
    what activation checkpointing does to every layer in the backward (a growing cache would hold
    the tokens twice by then, so transformers' checkpointed layers drop any other cache)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class Prompt(nn.Module):
    """What a prompt puts in front of the frozen model; a prompt of no kind (`NoPrompt`) puts
    nothing. Subclasses are the kinds."""

    kv_length = 0
    input_length = 0

    def keys_values(self) -> torch.Tensor | None:
        """[layers, 2, kv_heads, kv_length, head_dim]: per layer, the key (0) and value (1) prefix."""
        return None

    def embeddings(self) -> torch.Tensor | None:
        """[input_length, hidden]"""
        return None

    def fold(self) -> torch.Tensor | None:
        """The plain table that reproduces this prompt at inference (None: no prompt)."""
        return None

    @property
    def length(self) -> int:
        return self.kv_length + self.input_length

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def init_from_tokens(self, base, ids: torch.Tensor, cache_kwarg: str) -> None:
        """Start from what the frozen model `base` makes of token `ids` [P] (see the kinds)."""
        raise ValueError("a model without a prompt has nothing to initialise")


class NoPrompt(Prompt):
    """Length 0 (a linear probe: head only)."""


class _Table(Prompt):
    """`length` trainable rows of width `out`, optionally produced by an MLP (THUDM's
    `prefix_projection`): Embedding(P, hidden) -> Linear -> Tanh -> Linear(out)."""

    def __init__(self, config: PromptConfig, out: int, hidden: int) -> None:
        super().__init__()
        self.rows_count = config.length
        # A buffer, not an arange per call: modules are called (never their .weight read
        # directly) so DeepSpeed ZeRO-3 gathers the partitioned parameters in its hooks.
        self.register_buffer("positions", torch.arange(config.length), persistent=False)
        if config.projection:
            self.embedding = nn.Embedding(config.length, hidden)
            self.mlp: nn.Module | None = nn.Sequential(
                nn.Linear(hidden, config.projection), nn.Tanh(), nn.Linear(config.projection, out)
            )
        else:
            self.embedding = nn.Embedding(config.length, out)
            self.mlp = None
        self.dropout = nn.Dropout(config.dropout)

    def rows(self) -> torch.Tensor:
        # under ZeRO-3 the buffer may stay on CPU while the (partitioned) weight lives on the GPU
        x = self.embedding(self.positions.to(self.embedding.weight.device))
        return self.mlp(x) if self.mlp is not None else x

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        """The plain [P, width] tensor that reproduces this prompt at inference."""
        return self.rows().detach().clone()

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor) -> None:
        """Set the plain table to `rows` [P, width] (collective under ZeRO-3)."""
        if self.mlp is not None:
            raise ValueError("the rows of an MLP-reparameterized prompt cannot be set directly")
        with gathered([self.embedding.weight], modifier_rank=0):
            self.embedding.weight.copy_(rows.to(self.embedding.weight))


class DeepPrefix(_Table):
    """P-Tuning v2: key/value prefixes for every layer."""

    def __init__(self, config: PromptConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry.num_layers * 2 * geometry.kv_width, geometry.hidden_size)
        self.geometry = geometry
        self.kv_length = config.length

    def keys_values(self) -> torch.Tensor:
        g = self.geometry
        rows = self.dropout(self.rows())
        return rows.view(self.kv_length, g.num_layers, 2, g.num_kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def init_from_tokens(self, base, ids: torch.Tensor, cache_kwarg: str) -> None:
        """The keys/values every layer computes for `ids` at positions 0..P-1, so the untrained
        prompt acts as if that text preceded every input. Under ZeRO-3 the base model runs layer
        by layer gathered; collective then (the same ids on every rank)."""
        inner = base.base_model
        cache = DynamicCache(config=base.config if self.geometry.is_decoder else None)
        device = next(inner.parameters()).device
        with gathered_per_module(inner):
            inner(input_ids=ids[None].to(device), use_cache=True, **{cache_kwarg: cache})
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float()
        self.set_rows(kv.permute(3, 0, 1, 2, 4).reshape(self.kv_length, -1))


class SoftPrompt(_Table):
    """Lester et al.'s prompt tuning: P trainable input embeddings, prepended to the tokens."""

    def __init__(self, config: PromptConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry.hidden_size, geometry.hidden_size)
        self.input_length = config.length

    def embeddings(self) -> torch.Tensor:
        return self.dropout(self.rows())

    @torch.no_grad()
    def init_from_tokens(self, base, ids: torch.Tensor, cache_kwarg: str) -> None:
        """The input embeddings of real tokens `ids` (Lester et al.'s best initialisation)."""
        table = base.get_input_embeddings()
        # under ZeRO-3 both tables are partitioned: gather, write on rank 0, re-partition
        with gathered([table.weight, self.embedding.weight], modifier_rank=0):
            self.embedding.weight.copy_(table.weight[ids.to(table.weight.device)].to(self.embedding.weight))


def make_prompt(config: PromptConfig, geometry: Geometry) -> Prompt:
    """The prompt `config` describes, for a base model of `geometry`."""
    if config.length == 0:
        return NoPrompt()
    return (DeepPrefix if config.method == "ptv2" else SoftPrompt)(config, geometry)


def folded_prompt(method: str, table: torch.Tensor | None, geometry: Geometry) -> Prompt:
    """A prompt holding a folded table (what artifacts keep for inference): no MLP, no dropout,
    its table's dtype and device."""
    length = 0 if table is None else table.shape[0]
    prompt = make_prompt(PromptConfig(method=method, length=length, init="normal"), geometry)
    if table is not None:
        prompt.load_state_dict({"embedding.weight": table})
        prompt.to(device=table.device, dtype=table.dtype)
    return prompt.eval().requires_grad_(False)


def count_prompt_parameters(config: PromptConfig, geometry: Geometry, folded: bool) -> int:
    """Number of prompt values: trainable (with the MLP) or folded (what inference keeps)."""
    if config.length == 0:
        return 0
    width = geometry.num_layers * 2 * geometry.kv_width if config.method == "ptv2" else geometry.hidden_size
    if folded or not config.projection:
        return config.length * width
    h, p = geometry.hidden_size, config.projection
    return config.length * h + (h * p + p) + (p * width + width)


# ---- the one way a prompt enters the model ----------------------------------------------------
@dataclass
class PromptedBatch:
    """The frozen model's keyword arguments for a batch (`kwargs`), and how wide the regions in
    front of the tokens are: `kv` cache positions, then `soft` input positions."""

    kwargs: dict
    kv: int
    soft: int
    mask: torch.Tensor | None = None  # [batch, kv + soft + tokens]: which positions are real

    @property
    def input_mask(self) -> torch.Tensor:
        """[batch, soft + tokens]: which input positions are real (soft prompt and tokens)."""
        mask = self.mask if self.mask is not None else self.kwargs["attention_mask"]
        return mask[:, self.kv :]

    def first_position(self) -> torch.Tensor:
        """Each row's first real input position (its soft prompt's first, or its first token)."""
        return self.input_mask.argmax(-1)

    def last_position(self) -> torch.Tensor:
        """Each row's last real input position (its last token)."""
        mask = self.input_mask
        return mask.shape[1] - 1 - mask.flip(-1).argmax(-1)


def _left_padded(pieces: list[torch.Tensor | None], width: int, like: torch.Tensor, batch: int) -> torch.Tensor:
    """Row i of the result holds pieces[i] [n_i, …] at its end, zeros before (n_i <= width)."""
    shape = next(p for p in pieces if p is not None).shape[1:]
    out = like.new_zeros(batch, width, *shape)
    for i, piece in enumerate(pieces):
        if piece is not None and piece.shape[0]:
            out[i, width - piece.shape[0] :] = piece.to(out)
    return out


def prompt_inputs(
    prompts: Prompt | Sequence[Prompt],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    embed: nn.Module,
    geometry: Geometry,
    cache_config,
    cache_kwarg: str,
    dtype: torch.dtype,
    token_type_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    segment_positions: torch.Tensor | None = None,
    cache: str = "replayable",
) -> PromptedBatch:
    """The keyword arguments that run `input_ids` [batch, length] (padded on either side, as
    `attention_mask` says) through the frozen model with `prompts`: one for every row, or one per
    row. Per-token `labels` and `token_type_ids` are padded over the soft prompts; sequence labels
    pass as they are. `cache`: "replayable" (a PrefixCache one forward reads, activation
    checkpointing included; none without a prefix) or "growing" (a DynamicCache that generation
    extends, empty without a prefix). Input embeddings replace the ids only where a soft prompt
    needs them. A packed batch (`ptv2.packing`) gives each token's `segment_ids` (0: padding) and
    its position in its segment: a token then sees the prompt and its own segment only, through
    a 4-D attention mask, its positions restarting after the prompt."""
    batch, _ = input_ids.shape
    shared = isinstance(prompts, Prompt)
    rows: Sequence[Prompt] = [prompts] * batch if shared else prompts
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} prompts for {batch} rows")
    device = input_ids.device
    kv_lengths = torch.tensor([p.kv_length for p in rows], device=device)
    soft_lengths = torch.tensor([p.input_length for p in rows], device=device)
    kv, soft = int(kv_lengths.max()), int(soft_lengths.max())
    columns = torch.arange(max(kv, soft), device=device)
    kv_mask = (columns[:kv] >= kv - kv_lengths[:, None]).to(attention_mask.dtype)
    soft_mask = (columns[:soft] >= soft - soft_lengths[:, None]).to(attention_mask.dtype)
    input_mask = torch.cat([soft_mask, attention_mask], dim=1)
    positions = (input_mask.cumsum(-1) - 1).clamp(min=0) + kv_lengths[:, None] + geometry.position_offset
    mask = torch.cat([kv_mask, input_mask], dim=1)
    kwargs: dict = {"attention_mask": mask, "position_ids": positions}
    if segment_ids is not None:
        starts = kv_lengths[:, None] + soft_lengths[:, None] + geometry.position_offset
        kwargs["position_ids"] = torch.cat([positions[:, :soft], segment_positions + starts], dim=1)
        kwargs["attention_mask"] = segment_mask(segment_ids, kv_mask, soft_mask, dtype)
    if soft:
        embeds = embed(input_ids)
        if shared:
            front = rows[0].embeddings().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        else:
            front = _left_padded([p.embeddings() for p in rows], soft, embeds, batch)
        kwargs["inputs_embeds"] = torch.cat([front, embeds], dim=1)
    else:
        kwargs["input_ids"] = input_ids
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, soft), token_type_ids], dim=1)
    if labels is not None:
        if labels.dim() == 2:  # one label per token
            labels = torch.cat([labels.new_full((batch, soft), IGNORE_INDEX), labels], dim=1)
        kwargs["labels"] = labels
    if kv or cache == "growing":
        if not kv:
            layers = []
        elif shared:
            kvs = rows[0].keys_values().to(dtype).unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)
            layers = [(kvs[i, 0], kvs[i, 1]) for i in range(kvs.shape[0])]
        else:
            # [batch, layers, 2, kv_heads, kv, head_dim] -> per layer [batch, kv_heads, kv, head_dim]
            per_row = [p.keys_values() for p in rows]
            per_row = [None if x is None else x.permute(3, 0, 1, 2, 4) for x in per_row]
            like = torch.empty((), dtype=dtype, device=device)
            buf = _left_padded(per_row, kv, like, batch).permute(2, 3, 0, 4, 1, 5)
            layers = [(buf[i, 0], buf[i, 1]) for i in range(buf.shape[0])]
        cls = PrefixCache if cache == "replayable" else DynamicCache
        kwargs[cache_kwarg] = cls(layers, config=cache_config) if layers else cls(config=cache_config)
    return PromptedBatch(kwargs, kv, soft, mask)
