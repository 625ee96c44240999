"""Tiny random-init models of every supported architecture (fast unit and distributed tests).

`initializer_range=0.2`: with the default 0.02 a frozen random model barely responds to its
prefix, so the learning tests would stall. Measured: 30 AdamW steps (lr 5e-2) on a prefix of 4
alone move the loss of tiny llama (causal-lm) 4.56 -> 4.48 and of tiny bert (seq-cls) 0.696 ->
0.694 at 0.02, against 4.96 -> 3.30 and 1.01 -> 0.56 at 0.2.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)

from ptv2.model import build_from_config

VOCAB = 96


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 kv heads
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            **common,
        )
    if arch == "qwen2":  # explicit head_dim different from hidden/heads
        return Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            pad_token_id=0,
            **common,
        )
    if arch == "mistral":
        return MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
            max_position_embeddings=128,
            pad_token_id=0,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common
        )
    if arch == "bert":
        return BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=0,
            **common,
        )
    if arch == "roberta":
        return RobertaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=130,
            pad_token_id=1,
            **common,
        )
    raise KeyError(arch)


DECODERS = ("llama", "qwen2", "mistral", "gpt2")
ENCODERS = ("bert", "roberta")
ARCHS = DECODERS + ENCODERS


def tiny_model(arch: str, task: str = "causal-lm", labels=None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_from_config(tiny_config(arch), task, labels)
    return model.eval()


def tiny_tokenizer(pad: bool = True):
    """A word-level tokenizer over the tiny vocabulary: "w0".."w92" plus [PAD] [UNK] [EOS].
    `pad=False`: no pad token, like GPT-2, Llama-3 and Mistral ([PAD] stays an ordinary token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **special)


def save_tiny(path, arch: str, task: str = "causal-lm", labels=None, seed: int = 0):
    """A tiny model + tokenizer folder that `from_pretrained` loads like a real checkpoint."""
    cfg = tiny_config(arch)
    if arch == "roberta":
        cfg.pad_token_id = 0
    torch.manual_seed(seed)
    # saved as a plain base model + config so every task head is "new" at load, as with real models
    model = build_from_config(cfg, task, labels)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_task_data(path, task: str, n: int = 64, seed: int = 0) -> None:
    """Synthetic but learnable examples in the jsonl layout of each task."""
    import json
    import random

    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [f"w{r.randrange(VOCAB - 3)}" for _ in range(r.randint(3, 8))]
            if task == "causal-lm":
                row = {"prompt": " ".join(words), "response": "w1 w2 " + words[0]}  # a constant part + a copy
            elif task == "seq-cls":
                row = {"text": " ".join(words), "label": "even" if int(words[0][1:]) % 2 == 0 else "odd"}
            else:
                row = {"tokens": words, "tags": ["B-x" if int(w[1:]) % 3 == 0 else "O" for w in words]}
            f.write(json.dumps(row) + "\n")
