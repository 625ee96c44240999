"""Sequence packing (data.packing): several examples in a row compute exactly what they compute
alone. A packed batch's loss and prompt gradient equal those of the same examples unpacked, on
Llama (GQA) and GPT-2, for both prompt methods and with activation checkpointing; no token
attends to another segment; packing is deterministic (a resumed job packs the same rows)."""

from __future__ import annotations

import pytest
import torch

from ptv2.data import collator, encode_examples
from ptv2.model import PromptedModel
from ptv2.packing import pack, packed_collator
from ptv2.settings import DataSettings, PromptConfig
from ptv2.tasks import IGNORE_INDEX
from tests.helpers import randomize_prompt
from tests.tiny import tiny_model, tiny_tokenizer

MAX_LENGTH = 16


def _examples(n: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        prompt = " ".join(f"w{int(x)}" for x in torch.randint(3, 90, (2 + i % 4,), generator=g))
        response = " ".join(f"w{int(x)}" for x in torch.randint(3, 90, (1 + (i * 5) % 6,), generator=g))
        rows.append({"prompt": prompt, "response": response})
    data = DataSettings(train_file="-", prompt_template="{prompt}", max_length=MAX_LENGTH)
    return encode_examples(rows, data, "causal-lm", None, tiny_tokenizer())


def _loss_and_grad(model: PromptedModel, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.prompt.parameters()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_batch_trains_exactly_as_its_examples_unpacked(arch, method, checkpointing):
    examples = _examples()
    rows = pack(examples, MAX_LENGTH, seed=0)
    assert len(rows) < len(examples) and any(len(r["input_ids"]) == MAX_LENGTH for r in rows)  # one full to the end
    assert sorted(n for r in rows for n in _segment_lengths(r)) == sorted(len(e["input_ids"]) for e in examples)
    model = PromptedModel(tiny_model(arch), PromptConfig(method=method, length=3, init="normal"), "causal-lm")
    randomize_prompt(model, scale=0.5)
    model.train()
    for module in model.modules():  # GPT-2's dropout would draw other masks for other layouts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.enable_gradient_checkpointing()
    unpacked = collator(tiny_tokenizer(), "causal-lm")(examples)
    packed = packed_collator(0)(rows)
    want_loss, want_grad = _loss_and_grad(model, unpacked)
    got_loss, got_grad = _loss_and_grad(model, packed)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    for got, want in zip(got_grad, want_grad, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _segment_lengths(row: dict) -> list[int]:
    ids = row["segment_ids"]
    return [ids.count(s) for s in sorted(set(ids))]


def test_a_token_sees_the_prompt_and_its_own_segment_only():
    model = PromptedModel(tiny_model("llama"), PromptConfig(length=3, init="normal"), "causal-lm")
    rows = pack(_examples(), MAX_LENGTH, seed=0)
    batch = packed_collator(0)(rows)
    prompted = model.inputs(**{k: v for k, v in batch.items() if k != "labels"})
    allowed = prompted.kwargs["attention_mask"][:, 0] == 0  # additive: 0 = attend
    segments = batch["segment_ids"]
    for b in range(len(rows)):
        for i in range(segments.shape[1]):
            if segments[b, i] == 0:
                continue
            assert allowed[b, i, :3].all()  # the whole prefix
            same = (segments[b] == segments[b, i]) & (torch.arange(segments.shape[1]) <= i)
            assert torch.equal(allowed[b, i, 3:], same)  # its own segment, causally; nothing else
    # positions restart after the prefix in every segment
    first = torch.nonzero(batch["segment_positions"] == 0)
    starts = prompted.kwargs["position_ids"][first[:, 0], first[:, 1]]
    assert (starts[segments[first[:, 0], first[:, 1]] > 0] == 3).all()


def test_packing_is_deterministic_and_no_target_crosses_a_segment():
    examples = _examples()
    assert pack(examples, MAX_LENGTH, seed=5) == pack(examples, MAX_LENGTH, seed=5)
    assert pack(examples, MAX_LENGTH, seed=5) != pack(examples, MAX_LENGTH, seed=6)
    for row in pack(examples, MAX_LENGTH, seed=5):
        starts = [i for i, p in enumerate(row["segment_positions"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
        assert len(row["input_ids"]) <= MAX_LENGTH


def test_only_causal_lm_jobs_pack(tmp_path):
    from launcher.spec import SpecError, load_spec
    from tests.helpers import write_spec

    path = write_spec(tmp_path, "seq-cls", "bert", ["even", "odd"], data={"packing": True})
    with pytest.raises(SpecError, match="data.packing: only causal-lm examples are packed, not seq-cls"):
        load_spec(path)
