"""Training touches only the prompt (and head); it learns; padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from ptv2.model import PromptedModel
from ptv2.settings import PromptConfig
from tests.helpers import fit, randomize_prompt
from tests.tiny import ARCHS, DECODERS, ENCODERS, tiny_model

T = 9


def _batch(task: str, seed: int = 0, batch: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, T), generator=g)
    if task == "causal-lm":
        # a learnable pattern: every other token repeats its predecessor
        ids[:, 1::2] = ids[:, 0:-1:2]
        return {"input_ids": ids, "labels": ids.clone()}
    if task == "seq-cls":
        return {"input_ids": ids, "labels": torch.arange(batch) % 2}
    return {"input_ids": ids, "labels": (ids % 3)}


def _task(arch: str) -> tuple[str, list[str] | None]:
    return ("causal-lm", None) if arch in DECODERS else ("seq-cls", ["neg", "pos"])


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
def test_only_prompt_and_head_require_grad(arch, method):
    task, labels = _task(arch)
    model = PromptedModel(tiny_model(arch, task, labels), PromptConfig(method=method, length=4), task)
    trainable = {n for n, _ in model.trainable_parameters()}
    prompt = {f"prompt.{n}" for n, _ in model.prompt.named_parameters()}
    head = {f"base.{n}" for n in model.head_names}
    assert trainable == prompt | head
    if task == "causal-lm":
        assert head == set()  # the LM head stays frozen
    else:
        assert head == {"base.classifier.weight", "base.classifier.bias"}


@pytest.mark.parametrize(
    "arch,task,method",
    [
        ("llama", "causal-lm", "ptv2"),
        ("gpt2", "causal-lm", "ptv2"),
        ("bert", "seq-cls", "ptv2"),
        ("llama", "causal-lm", "prompt-tuning"),
        ("bert", "token-cls", "ptv2"),
        ("roberta", "seq-cls", "ptv2"),
        ("qwen2", "causal-lm", "ptv2"),
        ("mistral", "causal-lm", "ptv2"),
    ],
)
def test_loss_falls_and_base_weights_stay_bit_identical(arch, task, method):
    labels = None if task == "causal-lm" else (["neg", "pos"] if task == "seq-cls" else ["A", "B", "C"])
    base = tiny_model(arch, task, labels)
    model = PromptedModel(base, PromptConfig(method=method, length=6, projection=16 if arch == "gpt2" else None), task)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if n not in model.head_names}
    head = {n: p.detach().clone() for n, p in model.head_state().items()}
    prompt = [p.detach().clone() for p in model.prompt.parameters()]
    losses = fit(model, _batch(task), steps=40, lr=5e-2)
    assert losses[-1] < 0.75 * losses[0], losses
    for n, p in base.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
            assert p.grad is None
    for n, p in model.head_state().items():
        assert not torch.equal(p, head[n]), f"head {n} did not train"
    assert all(not torch.equal(a, b) for a, b in zip(prompt, model.prompt.parameters(), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
@torch.no_grad()
def test_padding_does_not_change_real_token_logits(arch, method):
    """Decoders pad on the left (as for generation), encoders on either side: the logits of the
    real tokens equal those of the same sequence run alone."""
    task, labels = ("causal-lm", None) if arch in DECODERS else ("token-cls", ["A", "B", "C"])
    model = PromptedModel(tiny_model(arch, task, labels), PromptConfig(method=method, length=4), task)
    randomize_prompt(model, scale=0.5)
    pad = model.base.config.pad_token_id
    seqs = [torch.randint(3, 96, (n,)) for n in (T, 4, 6)]
    alone = [model(s[None]).logits[0] for s in seqs]
    sides = ("left",) if arch in DECODERS else ("left", "right")
    for side in sides:
        ids = torch.full((len(seqs), T), pad)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        logits = model(ids, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(logits[i, sl], alone[i], rtol=1e-4, atol=1e-4, msg=f"{side} pad row {i}")


@pytest.mark.parametrize("arch", ENCODERS)
@torch.no_grad()
def test_sequence_classification_ignores_right_padding(arch):
    model = PromptedModel(tiny_model(arch, "seq-cls", ["a", "b"]), PromptConfig(length=4), "seq-cls")
    randomize_prompt(model, scale=0.5)
    s = torch.randint(3, 96, (5,))
    alone = model(s[None]).logits
    padded = torch.cat([s, torch.full((4,), model.base.config.pad_token_id)])[None]
    mask = torch.tensor([[1] * 5 + [0] * 4])
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning", "none"])
@pytest.mark.parametrize("pad_id", ["config", "unset"])
@torch.no_grad()
def test_decoder_classifier_reads_the_last_real_token_under_right_padding(arch, method, pad_id):
    """Our collate pads on the right: each row's logits (and the loss) equal those of the row
    run alone, unpadded, for both methods; also when a real token equals the pad id (GPT-2 and
    Llama-3 pad with EOS) and when the config sets no pad id."""
    labels = ["a", "b", "c"]
    cfg = PromptConfig(method="ptv2" if method == "none" else method, length=0 if method == "none" else 4)
    model = PromptedModel(tiny_model(arch, "seq-cls", labels), cfg, "seq-cls")
    if model.prompt.length:
        randomize_prompt(model, scale=0.5)
    pad = model.base.config.pad_token_id
    if pad_id == "unset":
        model.base.config.pad_token_id = None
    seqs = [torch.randint(3, 96, (n,)) for n in (T, 4, 6)]
    seqs[2][-1] = pad  # a real last token that happens to be the pad id
    # reference: the head on the final hidden state of the row run alone (no padding anywhere)
    last = [model.base.base_model(**model.inputs(s[None]).kwargs).last_hidden_state[:, -1] for s in seqs]
    alone = model.base.score(torch.cat(last))
    torch.testing.assert_close(torch.cat([model(s[None]).logits for s in seqs]), alone, rtol=1e-5, atol=1e-5)
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    gold = torch.tensor([0, 2, 1])
    out = model(ids, attention_mask=mask, labels=gold)
    torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(alone, gold), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    model = PromptedModel(tiny_model("llama"), PromptConfig(length=4, dropout=0.5), "causal-lm")
    ids = torch.randint(3, 96, (2, T))
    model.eval()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c = model(ids).logits
    assert (c - a).abs().max() > 0


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
def test_response_only_training_loss_equals_the_full_logits_loss(arch, method):
    """Training applies the LM head only at labelled positions; the loss (and its gradient) is
    the one HF computes from every position's logits."""
    model = PromptedModel(tiny_model(arch), PromptConfig(method=method, length=4), "causal-lm").eval()
    ids = torch.randint(3, 96, (3, T))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt part
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels[1, 7:] = -100
    fast = model.task.response_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}).loss
    fast.backward()
    g_fast = [p.grad.clone() for p in model.prompt.parameters()]
    model.zero_grad()
    full = model(ids, attention_mask=mask, labels=labels).loss  # eval mode: HF's loss over all logits
    full.backward()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    for a, p in zip(g_fast, model.prompt.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
