"""Inference (ptv2.infer): tokenizers without a pad token, batches equal to one input at a time,
and the prompt template and max length stored with the prompt."""

from __future__ import annotations

import json

import pytest

from ptv2.artifact import MANIFEST, ArtifactError, load_prompt, read_manifest, save_prompt
from ptv2.infer import apply_template, generate, predict
from ptv2.model import PromptedModel
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt
from tests.tiny import tiny_model, tiny_tokenizer

TEXTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w4 w4", "w20 w21 w22 w23"]
TEMPLATE = "w30 w31 {prompt} w32"


def _saved(tmp_path, arch, task, labels=None, method="ptv2", **data):
    model = PromptedModel(tiny_model(arch, task, labels), PromptConfig(method=method, length=3), task)
    randomize_prompt(model, scale=0.5)
    path = save_prompt(model, tmp_path / f"{arch}-{task}-{method}", base_name_or_path=arch, labels=labels, **data)
    return load_prompt(path, tiny_model(arch, task, labels))


@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
def test_generate_with_a_padless_tokenizer_batches_like_one_at_a_time(tmp_path, method):
    tok = tiny_tokenizer(pad=False)
    assert tok.pad_token is None
    model = _saved(tmp_path, "llama", "causal-lm", method=method)
    batched = generate(model, tok, TEXTS, max_new_tokens=6, batch_size=8)
    alone = [generate(model, tok, [t], max_new_tokens=6)[0] for t in TEXTS]
    assert batched == alone and len(batched) == len(TEXTS) and any(batched)
    assert tok.pad_token is None and tok.padding_side == "right"  # the caller's tokenizer is unchanged


@pytest.mark.parametrize(
    "arch,task,labels",
    [("llama", "seq-cls", ["a", "b", "c"]), ("gpt2", "seq-cls", ["a", "b"]), ("bert", "token-cls", ["O", "B-x"])],
)
def test_predict_with_a_padless_tokenizer_batches_like_one_at_a_time(tmp_path, arch, task, labels):
    tok = tiny_tokenizer(pad=False)
    model = _saved(tmp_path, arch, task, labels)
    batched = predict(model, tok, TEXTS, batch_size=8)
    alone = [predict(model, tok, [t])[0] for t in TEXTS]
    for b, a in zip(batched, alone, strict=True):
        if task == "seq-cls":
            assert b["label"] == a["label"]
            assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
        else:
            assert b == a
    assert tok.pad_token is None


def test_manifest_stores_the_template_and_max_length_and_generate_applies_the_template(tmp_path):
    tok = tiny_tokenizer()
    model = _saved(tmp_path, "llama", "causal-lm", template=TEMPLATE, max_length=16)
    manifest = read_manifest(tmp_path / "llama-causal-lm-ptv2")
    assert manifest["data"] == {"prompt_template": TEMPLATE, "max_length": 16}
    assert (model.prompt_template, model.max_length) == (TEMPLATE, 16)
    laid_out = ["w30 w31 w1 w2 w3 w32", "w30 w31 w5 w32"]
    assert apply_template(model.prompt_template, TEXTS[:2]) == laid_out
    assert apply_template(manifest["data"]["prompt_template"], TEXTS[:2]) == laid_out
    by_default = generate(model, tok, TEXTS[:2], max_new_tokens=5)
    assert by_default == generate(model, tok, laid_out, max_new_tokens=5, raw=True)
    assert apply_template(None, TEXTS[:2]) == TEXTS[:2]  # artifacts without a stored template
    assert apply_template("{prompt} {x}", ["{y}"]) == ["{y} {x}"]  # a plain replace, no str.format


def test_predict_truncates_to_the_stored_max_length_by_default(tmp_path):
    tok = tiny_tokenizer()
    model = _saved(tmp_path, "bert", "seq-cls", ["a", "b"], max_length=8)
    long = " ".join(f"w{i}" for i in range(3, 23))  # 20 tokens
    short = " ".join(long.split()[:8])
    assert predict(model, tok, [long])[0]["scores"] == pytest.approx(predict(model, tok, [short])[0]["scores"])
    full = predict(model, tok, [long], max_length=20)[0]["scores"]
    assert full != pytest.approx(predict(model, tok, [short])[0]["scores"])  # an explicit limit wins


def test_bad_data_settings_are_refused(tmp_path):
    model = PromptedModel(tiny_model("llama"), PromptConfig(length=3), "causal-lm")
    with pytest.raises(ArtifactError, match="data.prompt_template must be a string containing"):
        save_prompt(model, tmp_path / "p", base_name_or_path="x", template="no slot")
    path = save_prompt(model, tmp_path / "q", base_name_or_path="x", template=TEMPLATE, max_length=8)
    m = json.loads((path / MANIFEST).read_text())
    m["data"]["max_length"] = "long"
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="data.max_length must be a positive integer, got 'long'"):
        load_prompt(path, tiny_model("llama"))
    del m["data"]  # an artifact written before "data" existed loads, with neither
    (path / MANIFEST).write_text(json.dumps(m))
    loaded = load_prompt(path, tiny_model("llama"))
    assert (loaded.prompt_template, loaded.max_length) == (None, None)
