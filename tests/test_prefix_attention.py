"""The prefix does exactly what P-Tuning v2 says: every layer's attention runs over
[prefix keys/values ; token keys/values], with real tokens numbered from P."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, DynamicCache

from ptv2.geometry import Geometry, UnsupportedModelError
from ptv2.model import PromptedModel, build_from_config, vocab_init_ids
from ptv2.prompt import count_prompt_parameters
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt, set_prefix
from tests.tiny import ARCHS, DECODERS, ENCODERS, tiny_config, tiny_model, tiny_tokenizer

P, T = 5, 7


def _capture(module):
    """Record the input hidden states and the output of `module`'s next call."""
    seen = {}

    def pre(mod, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)

    def post(mod, args, kwargs, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    handles = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    ]
    return seen, handles


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attend(q, k, v, causal_from: int | None):
    """softmax(q kᵀ/√d) v over all keys; with `causal_from`=P, query i sees keys < P + i + 1."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal_from is not None:
        tq, tk = q.shape[-2], k.shape[-2]
        allowed = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + causal_from)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@torch.no_grad()
def test_llama_gqa_layer_attention_equals_hand_computation():
    model = PromptedModel(tiny_model("llama"), PromptConfig(length=P), "causal-lm")
    randomize_prompt(model)
    g = model.geometry
    assert (g.num_heads, g.num_kv_heads, g.head_dim) == (4, 2, 8)
    attn = model.base.model.layers[1].self_attn
    seen, handles = _capture(attn)
    ids = torch.randint(2, 96, (2, T))
    model(ids)
    for h in handles:
        h.remove()
    h = seen["h"]
    B = h.shape[0]
    q = attn.q_proj(h).view(B, T, g.num_heads, g.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)
    # RoPE at positions P..P+T-1: the real tokens come after the P prefix slots.
    cos, sin = model.base.model.rotary_emb(h, torch.arange(P, P + T)[None].expand(B, -1))
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    kv = model.prompt.keys_values()  # [layers, 2, kv_heads, P, head_dim]
    keys = torch.cat([kv[1, 0].expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([kv[1, 1].expand(B, -1, -1, -1), v], dim=2)
    groups = g.num_heads // g.num_kv_heads  # each kv head serves `groups` query heads
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    ctx = _attend(q, keys, values, causal_from=P).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(seen["out"], attn.o_proj(ctx), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_gpt2_layer_attention_equals_hand_computation():
    model = PromptedModel(tiny_model("gpt2"), PromptConfig(length=P), "causal-lm")
    randomize_prompt(model)
    g = model.geometry
    attn = model.base.transformer.h[0].attn
    seen, handles = _capture(attn)
    model(torch.randint(2, 96, (2, T)))
    for h in handles:
        h.remove()
    h = seen["h"]
    B = h.shape[0]
    q, k, v = attn.c_attn(h).split(g.hidden_size, dim=2)
    q, k, v = (x.view(B, T, g.num_heads, g.head_dim).transpose(1, 2) for x in (q, k, v))
    kv = model.prompt.keys_values()
    keys = torch.cat([kv[0, 0].expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([kv[0, 1].expand(B, -1, -1, -1), v], dim=2)
    ctx = _attend(q, keys, values, causal_from=P).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(seen["out"], attn.c_proj(ctx), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_bert_layer_attention_equals_hand_computation():
    model = PromptedModel(tiny_model("bert", "seq-cls", ["a", "b"]), PromptConfig(length=P), "seq-cls")
    randomize_prompt(model)
    g = model.geometry
    attn = model.base.bert.encoder.layer[1].attention.self
    seen, handles = _capture(attn)
    model(torch.randint(2, 96, (2, T)))
    for h in handles:
        h.remove()
    h = seen["h"]
    B = h.shape[0]
    q, k, v = (lin(h).view(B, T, g.num_heads, g.head_dim).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
    kv = model.prompt.keys_values()
    keys = torch.cat([kv[1, 0].expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([kv[1, 1].expand(B, -1, -1, -1), v], dim=2)
    ctx = _attend(q, keys, values, causal_from=None).transpose(1, 2).reshape(B, T, -1)  # bidirectional
    torch.testing.assert_close(seen["out"], ctx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
@torch.no_grad()
def test_prefix_from_real_tokens_equals_running_them(arch):
    """If the prefix holds the keys/values the model itself computed for tokens `a`, the prompted
    model on `b` must give the logits of the plain model on `a + b`: positions and cache agree."""
    base = tiny_model(arch)
    a, b = torch.randint(2, 96, (1, P)), torch.randint(2, 96, (1, T))
    full = base(torch.cat([a, b], 1)).logits[:, P:]
    out = base(a, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    model = PromptedModel(base, PromptConfig(length=P), "causal-lm")
    set_prefix(model, kv)
    torch.testing.assert_close(model(b).logits, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
@torch.no_grad()
def test_token_initialised_prefix_acts_as_those_tokens(arch):
    """init vocab/text: before any training the prompt is the model's own reading of real tokens,
    so the prompted model on `b` is the plain model on `a + b`; the base stays untouched."""
    base = tiny_model(arch)
    a, b = torch.randint(2, 96, (P,)), torch.randint(2, 96, (1, T))
    full = base(torch.cat([a[None], b], 1)).logits[:, P:]
    before = {n: p.clone() for n, p in base.state_dict().items()}
    model = PromptedModel(base, PromptConfig(length=P, init="text"), "causal-lm")
    model.init_prompt_from_tokens(a)
    torch.testing.assert_close(model(b).logits, full, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())


@pytest.mark.parametrize("arch", ENCODERS)
@torch.no_grad()
def test_token_initialised_prefix_holds_the_encoders_keys_values(arch):
    base = tiny_model(arch, "seq-cls", ["a", "b"])
    a = torch.randint(2, 96, (P,))
    model = PromptedModel(base, PromptConfig(length=P, init="text"), "seq-cls")
    model.init_prompt_from_tokens(a)
    cache = DynamicCache(config=None)
    base.base_model(input_ids=a[None], use_cache=True, **{model.cache_kwarg: cache})
    expected = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    torch.testing.assert_close(model.prompt.keys_values(), expected)


@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
def test_vocab_init_is_real_tokens_and_the_default_except_ptv2_on_encoders(method):
    model = PromptedModel(tiny_model("llama"), PromptConfig(method=method, length=P, init="vocab"), "causal-lm")
    ref = PromptedModel(tiny_model("llama"), PromptConfig(method=method, length=P, init="normal"), "causal-lm")
    ids = torch.randint(0, 96, (P,))  # tiny_model reseeds: the draw `model` made at this point
    assert not torch.equal(model.prompt.fold(), ref.prompt.fold())
    ref.init_prompt_from_tokens(ids)
    torch.testing.assert_close(model.prompt.fold(), ref.prompt.fold())
    assert PromptConfig(method=method).resolved_init("decoder") == "vocab"
    assert PromptConfig(method=method).resolved_init("encoder") == ("vocab" if method == "prompt-tuning" else "normal")
    assert PromptConfig(method=method, projection=8).resolved_init("decoder") == "normal"
    with pytest.raises(ValueError, match="need 5 token ids"):
        ref.init_prompt_from_tokens(ids[:2])


@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
def test_vocab_init_draws_real_tokens_only_from_a_padded_embedding(method, monkeypatch):
    """Checkpoints pad the embedding matrix beyond the vocabulary (rows no token uses): init
    vocab draws from the tokenizer's tokens, its special ones excluded."""
    tok = tiny_tokenizer()  # 96 tokens; [PAD] [UNK] [EOS] are 0, 1, 2
    base = tiny_model("llama")
    base.resize_token_embeddings(160)  # rows 96..159 belong to no token (config.vocab_size follows)
    drawn = []
    monkeypatch.setattr(PromptedModel, "init_prompt_from_tokens", lambda self, ids: drawn.append(ids))
    cfg = PromptConfig(method=method, length=100, init="vocab")
    for seed in range(4):
        torch.manual_seed(seed)
        PromptedModel(base, cfg, "causal-lm", init_vocab=vocab_init_ids(tok))
    ids = torch.cat(drawn)
    assert ids.max() < len(tok) and not torch.isin(ids, torch.tensor(tok.all_special_ids)).any()
    assert len(ids.unique()) > 80  # all the other tokens are drawn from
    drawn.clear()
    PromptedModel(base, cfg, "causal-lm", init_vocab=len(tok))  # a vocabulary size
    assert drawn[0].max() < len(tok)
    with pytest.raises(ValueError, match="no token id below the 160 embedding rows"):
        PromptedModel(base, cfg, "causal-lm", init_vocab=torch.tensor([200, 300]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
@torch.no_grad()
def test_zero_length_prompt_is_the_plain_model(arch, method):
    task, labels = ("causal-lm", None) if arch in DECODERS else ("seq-cls", ["x", "y"])
    base = tiny_model(arch, task, labels)
    ids = torch.randint(2, 96, (3, T))
    plain = base(ids).logits
    model = PromptedModel(base, PromptConfig(method=method, length=0), task)
    assert model.prompt.length == 0
    torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_a_prefix_changes_every_architecture(arch):
    """The injected cache is really used (a silently ignored prefix would leave logits equal)."""
    task, labels = ("causal-lm", None) if arch in DECODERS else ("token-cls", ["O", "B", "I"])
    base = tiny_model(arch, task, labels)
    ids = torch.randint(2, 96, (2, T))
    plain = base(ids).logits
    for method in ("ptv2", "prompt-tuning"):
        model = PromptedModel(base, PromptConfig(method=method, length=P), task)
        randomize_prompt(model)
        logits = model(ids).logits
        assert logits.shape == plain.shape
        assert (logits - plain).abs().max() > 1e-3, method


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_is_sized_by_kv_heads_and_head_dim(arch):
    cfg = tiny_config(arch)
    g = Geometry.of(cfg)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert (g.num_kv_heads, g.head_dim, g.num_layers) == (kv_heads, head_dim, cfg.num_hidden_layers)
    model = PromptedModel(tiny_model(arch, "seq-cls", ["a", "b"]), PromptConfig(length=P), "seq-cls")
    assert model.prompt.keys_values().shape == (g.num_layers, 2, kv_heads, P, head_dim)
    n = sum(p.numel() for p in model.prompt.parameters())
    assert n == P * g.num_layers * 2 * kv_heads * head_dim == count_prompt_parameters(PromptConfig(length=P), g, True)


def test_qwen2_explicit_head_dim_is_used_not_hidden_over_heads():
    g = Geometry.of(tiny_config("qwen2"))
    assert g.head_dim == 16 != 32 // 4 and g.kv_width == 16


@torch.no_grad()
def test_mlp_reparameterization_folds_to_the_same_prefix():
    base = tiny_model("llama")
    cfg = PromptConfig(length=P, projection=24)
    model = PromptedModel(base, cfg, "causal-lm")
    randomize_prompt(model, scale=0.3)
    assert sum(p.numel() for p in model.prompt.parameters()) == count_prompt_parameters(cfg, model.geometry, False)
    ids = torch.randint(2, 96, (2, T))
    before = model(ids).logits
    folded = PromptedModel(base, PromptConfig(length=P), "causal-lm")
    folded.prompt.embedding.weight.copy_(model.prompt.fold())
    torch.testing.assert_close(folded(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_refused_by_name():
    cfg = AutoConfig.for_model(
        "opt",
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        word_embed_proj_dim=16,
    )
    with pytest.raises(UnsupportedModelError, match="'opt' is not supported.*llama"):
        build_from_config(cfg, "causal-lm")
    with pytest.raises(UnsupportedModelError, match="opt"):
        Geometry.of(cfg)


def test_prompt_longer_than_the_model_allows_is_refused():
    with pytest.raises(ValueError, match="allows 128 positions"):
        PromptedModel(tiny_model("llama"), PromptConfig(length=128), "causal-lm")


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(method="lora"), "method"),
        (dict(length=-1), "length"),
        (dict(projection=0), "projection"),
        (dict(dropout=1.5), "dropout"),
        (dict(lenght=4), "lenght"),
        (dict(init="zeros"), "init"),
        (dict(init="vocab", projection=64), "projection"),
    ],
)
def test_bad_prompt_settings_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        PromptConfig(**bad)
