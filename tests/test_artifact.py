"""Prompt artifacts: save -> load gives the same model; anything wrong is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptv2.artifact import FOLDED, MANIFEST, RAW, ArtifactError, load_prompt, read_manifest, save_prompt, sha256_file
from ptv2.model import PromptedModel
from ptv2.settings import PromptConfig
from tests.helpers import fit, randomize_prompt
from tests.tiny import tiny_config, tiny_model

T = 8
CASES = [
    ("llama", "causal-lm", PromptConfig(length=4)),
    ("llama", "causal-lm", PromptConfig(length=4, projection=12, dropout=0.1)),
    ("gpt2", "causal-lm", PromptConfig(method="prompt-tuning", length=3)),
    ("bert", "seq-cls", PromptConfig(length=4)),
    ("roberta", "token-cls", PromptConfig(length=4, projection=8)),
    ("bert", "seq-cls", PromptConfig(length=0)),  # linear probe: head only
]


def _labels(task):
    return {"causal-lm": None, "seq-cls": ["neg", "pos"], "token-cls": ["O", "B-x", "I-x"]}[task]


def _trained(arch, task, cfg, seed=0):
    model = PromptedModel(tiny_model(arch, task, _labels(task), seed=seed), cfg, task)
    if model.prompt.length:
        randomize_prompt(model, seed=1, scale=0.5)
    ids = torch.randint(3, 96, (4, T))
    labels = ids if task == "causal-lm" else (torch.tensor([0, 1, 0, 1]) if task == "seq-cls" else ids % 3)
    fit(model, {"input_ids": ids, "labels": labels}, steps=3)
    return model


@pytest.fixture
def saved(tmp_path):
    model = _trained("llama", "causal-lm", PromptConfig(length=4, projection=12))
    path = save_prompt(model, tmp_path / "prompt", base_name_or_path="tiny-llama")
    return model, path


@pytest.mark.parametrize("arch,task,cfg", CASES)
def test_save_then_load_into_a_fresh_plain_model_gives_identical_logits(tmp_path, arch, task, cfg):
    model = _trained(arch, task, cfg)
    ids = torch.randint(3, 96, (3, T))
    with torch.no_grad():
        expected = model(ids).logits
    path = save_prompt(model, tmp_path / "p", base_name_or_path=f"tiny-{arch}", labels=_labels(task))
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, FOLDED, RAW])
    for trainable in (False, True):
        fresh = tiny_model(arch, task, _labels(task))  # same seed: the same frozen base
        loaded = load_prompt(path, fresh, trainable=trainable).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert loaded.prompt_config == cfg  # the raw state keeps the MLP and dropout settings


def test_manifest_describes_every_tensor_and_file(saved):
    model, path = saved
    m = read_manifest(path)
    assert m["prompt"] == {"method": "ptv2", "length": 4, "projection": 12, "dropout": 0.0, "init": None}
    assert m["task"] == "causal-lm"
    g = m["base_model"]["geometry"]
    assert (g["num_layers"], g["num_kv_heads"], g["head_dim"]) == (2, 2, 8)
    assert m["tensors"][FOLDED]["prompt.embedding.weight"] == {"shape": [4, 2 * 2 * 2 * 8], "dtype": "float32"}
    assert set(m["tensors"][RAW]) == {f"prompt.{k}" for k in model.prompt.state_dict()}
    for name in (FOLDED, RAW):
        assert m["files"][name] == sha256_file(path / name)
    for pkg in ("torch", "transformers", "safetensors"):
        assert m["versions"][pkg]
    assert m["base_model"]["fingerprint"]["weights_sha256"]


@torch.no_grad()
def _greedy(model, ids, mask, steps, pad, eos):
    """Greedy decoding by hand: the prompted forward over the whole sequence at every step, no
    cache; rows that produced EOS continue with pads, and all done ends it (as HF does)."""
    new, done = [], torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        token = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        done |= token == eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return torch.stack(new, 1)


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("llama", PromptConfig(length=4, projection=12)),
        ("qwen2", PromptConfig(length=3)),
        ("gpt2", PromptConfig(method="prompt-tuning", length=3)),
    ],
)
def test_generation_with_the_loaded_prompt_is_greedy_decoding_token_for_token(tmp_path, arch, cfg):
    """The loaded prompt's `generate` (HF generate with the prefix cache or prompt embeddings, left
    padding) continues every row exactly as greedy decoding with the trained model's forward."""
    model = _trained(arch, "causal-lm", cfg).eval()
    path = save_prompt(model, tmp_path / "p", base_name_or_path=f"tiny-{arch}")
    loaded = load_prompt(path, tiny_model(arch))
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 0, 0, 9, 8]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [3]])).long()
    steps, eos = 8, loaded.base.generation_config.eos_token_id
    new = loaded.generate(ids, mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)  # no_grad inside
    expected = _greedy(model, ids, mask, steps, pad=0, eos=eos)
    assert new.shape == expected.shape and torch.equal(new, expected), (new, expected)
    # and the prompt matters: the plain base continues differently
    plain = _greedy(tiny_model(arch), ids, mask, steps, pad=0, eos=eos)
    assert not torch.equal(new, plain)


def test_wrong_base_model_weights_are_refused(saved):
    _, path = saved
    with pytest.raises(ArtifactError, match=r"different base model \(tiny-llama\).*tensor .*weights differ"):
        load_prompt(path, tiny_model("llama", seed=7))


def test_wrong_architecture_is_refused_naming_the_fields(saved):
    _, path = saved
    cfg = tiny_config("llama")
    cfg.num_key_value_heads = 4
    from ptv2.model import build_from_config

    other = build_from_config(cfg, "causal-lm")
    with pytest.raises(ArtifactError, match="num_kv_heads: prompt was trained with 2, model has 4"):
        load_prompt(path, other)
    with pytest.raises(ArtifactError, match="model_type: prompt was trained with 'llama', model has 'gpt2'"):
        load_prompt(path, tiny_model("gpt2"))


def test_same_model_in_bfloat16_is_accepted(saved):
    _, path = saved
    load_prompt(path, tiny_model("llama").to(torch.bfloat16))


def test_tampered_file_is_refused(saved):
    _, path = saved
    f = path / FOLDED
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"prompt.safetensors: checksum mismatch"):
        load_prompt(path, tiny_model("llama"))


def test_truncated_file_is_refused(saved):
    _, path = saved
    f = path / RAW
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="trainable.safetensors: checksum mismatch.*truncated"):
        load_prompt(path, tiny_model("llama"), trainable=True)


def test_wrong_shapes_are_refused_even_with_a_consistent_checksum(saved):
    """A tensor replaced by one of another shape (and the checksum updated to match) is caught
    by the manifest's shapes."""
    _, path = saved
    f = path / FOLDED
    tensors = load_file(f)
    tensors["prompt.embedding.weight"] = tensors["prompt.embedding.weight"][:3]
    save_file(tensors, f)
    m = json.loads((path / MANIFEST).read_text())
    m["files"][FOLDED] = sha256_file(f)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="tensors differ from the manifest at prompt.embedding.weight"):
        load_prompt(path, tiny_model("llama"))


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_prompt(tmp_path, tiny_model("llama"))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_existing_folder_is_not_overwritten_and_nothing_half_written(tmp_path, saved):
    model, path = saved
    before = {p.name: sha256_file(p) for p in path.iterdir()}
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        save_prompt(model, path, base_name_or_path="x")
    assert {p.name: sha256_file(p) for p in path.iterdir()} == before
    # a failure after the tensor files were written (the manifest cannot be serialised)
    with pytest.raises(TypeError):
        save_prompt(model, tmp_path / "new", base_name_or_path="x", extra={"bad": object()})
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "files,message",
    [
        ({"../../etc/passwd": "0" * 64}, r"names '\.\./\.\./etc/passwd'; an artifact holds only"),
        ({"/etc/passwd": "0" * 64}, r"names '/etc/passwd'"),
        ({f"sub/{FOLDED}": "0" * 64}, rf"names 'sub/{FOLDED}'"),
        ({f"./{FOLDED}": "0" * 64}, rf"names './{FOLDED}'"),
        ({"..": "0" * 64}, r"names '\.\.'"),
        ({"notes.txt": "0" * 64}, r"names 'notes.txt'"),
        ("prompt.safetensors", "'files' must map file names"),
        ({FOLDED: "0" * 64}, rf"'files' lacks {RAW}"),
        ({FOLDED: "0" * 64, RAW: 5}, rf"no sha256 hex digest for {RAW}"),
    ],
    ids=["parent", "absolute", "subfolder", "dot-slash", "dotdot", "unknown", "not-a-mapping", "missing", "digest"],
)
def test_crafted_manifest_file_names_are_refused_before_any_file_is_read(saved, monkeypatch, files, message):
    """Only the format's own files, by bare name, each with a checksum: a crafted manifest can
    neither make loading hash a path outside the artifact nor skip a file's checksum."""
    from ptv2 import artifact

    _, path = saved
    m = json.loads((path / MANIFEST).read_text())
    m["files"] = files
    (path / MANIFEST).write_text(json.dumps(m))
    opened = []
    monkeypatch.setattr(artifact, "sha256_file", lambda p: opened.append(p) or "0" * 64)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(path)
    with pytest.raises(ArtifactError, match=message):
        load_prompt(path, tiny_model("llama"), trainable=True)
    assert opened == []
