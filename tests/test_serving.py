"""Mixed-prompt batches (ptv2.serving): every row of a batch that mixes prompts of different
lengths, methods and tasks gives what that prompt gives alone (`PromptedModel`, `ptv2 predict`,
`ptv2 generate`); the bank verifies what it loads and stays within its bounds."""

from __future__ import annotations

import json

import pytest
import torch

from ptv2 import generation as gen
from ptv2 import serving as sv
from ptv2.artifact import FOLDED, MANIFEST, ArtifactError
from ptv2.infer import generate as generate_alone
from ptv2.infer import predict as predict_alone
from tests.serving_helpers import alone, make_prompt, save_base
from tests.tiny import tiny_tokenizer

TEXTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w4 w4 w9"]
# (task, method, length): different lengths, both methods, every head, and no prompt at all
DECODER_PROMPTS = [
    ("causal-lm", "ptv2", 2),
    ("causal-lm", "ptv2", 7),
    ("causal-lm", "prompt-tuning", 4),
    ("seq-cls", "ptv2", 3),
    ("seq-cls", "prompt-tuning", 5),
    ("token-cls", "ptv2", 6),
]
ENCODER_PROMPTS = [
    ("seq-cls", "ptv2", 2),
    ("seq-cls", "ptv2", 8),
    ("seq-cls", "prompt-tuning", 3),
    ("seq-cls", "ptv2", 0),
    ("token-cls", "ptv2", 5),
    ("token-cls", "prompt-tuning", 2),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {arch: save_base(d / arch, arch) for arch in ("llama", "gpt2", "bert", "qwen2", "roberta")}


def _bank(tmp_path, base_dir, specs, attn="sdpa", **bank_kwargs):
    # the tiny word-level tokenizer itself: AutoTokenizer maps a qwen2 folder to Qwen2's own class
    served = sv.ServedBase.load(base_dir, tokenizer=tiny_tokenizer(), attn_implementation=attn)
    bank = sv.PromptBank(served, **bank_kwargs)
    for i, (task, method, length) in enumerate(specs):
        bank.load(f"p{i}", make_prompt(tmp_path / f"p{i}", base_dir, task, method, length, seed=i))
    return served, bank


def _lm_logits(served, rows):
    """Next-token logits over every input token, from ONE forward of the mixed batch."""
    batch = served.batch_inputs(rows, side="right")
    tokens = batch.input_mask[:, batch.soft :].bool()
    with torch.inference_mode():
        hidden = served.body(**batch.kwargs, use_cache=False).last_hidden_state[:, batch.soft :]
        return [served.lm_head(hidden[i][tokens[i]]) for i in range(len(rows))]


def _alone_logits(model, row):
    ids = torch.tensor([row.ids])
    types = torch.tensor([row.token_types]) if row.token_types else None
    with torch.no_grad():
        return model(input_ids=ids, token_type_ids=types).logits[0]


@pytest.mark.parametrize(
    "arch,attn",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("gpt2", "sdpa"),
        ("bert", "sdpa"),
        ("bert", "eager"),
        ("qwen2", "sdpa"),  # head_dim != hidden / heads, one kv head
        ("roberta", "sdpa"),  # positions from padding_idx + 1, a two-layer classification head
    ],
)
def test_each_row_of_a_mixed_batch_equals_its_prompt_alone(tmp_path, bases, arch, attn):
    specs = ENCODER_PROMPTS if arch in ("bert", "roberta") else DECODER_PROMPTS
    served, bank = _bank(tmp_path, bases[arch], specs, attn)
    prompts = [bank.get(f"p{i}") for i in range(len(specs))]
    assert {p.manifest["prompt"]["method"] for p in prompts} >= {"ptv2", "prompt-tuning"}
    assert len({p.length for p in prompts}) >= 4
    # every prompt with texts of different lengths, interleaved: one batch, one body forward
    lm_rows = [gen.encode_generate(served, p, t, raw=True) for t in TEXTS for p in prompts if p.task.generates]
    cls_rows = [sv.encode_predict(served, p, t) for t in TEXTS for p in prompts if not p.task.generates]
    calls = []
    hook = served.body.register_forward_hook(lambda *a: calls.append(1))
    mixed = sv.predict_logits(served, cls_rows)
    hook.remove()
    assert len(calls) == 1
    if lm_rows:
        mixed += _lm_logits(served, lm_rows)
    worst = 0.0
    for row, got in zip(cls_rows + lm_rows, mixed, strict=True):
        ref = _alone_logits(alone(row.prompt.path, bases[arch]), row)
        if row.prompt.task.generates:
            assert got.shape == ref.shape == (len(row.ids), 96)
        assert got.shape == ref.shape
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_a_batch_without_any_deep_prefix_equals_each_prompt_alone(tmp_path, bases, arch):
    """Only prompt-tuning and prompt-less rows: the cache holds nothing, inputs still differ."""
    served, bank = _bank(tmp_path, bases[arch], [("seq-cls", "prompt-tuning", 3), ("seq-cls", "ptv2", 0)])
    rows = [sv.encode_predict(served, bank.get(f"p{i}"), t) for t in TEXTS for i in range(2)]
    for row, got in zip(rows, sv.predict_logits(served, rows), strict=True):
        assert float((got - _alone_logits(alone(row.prompt.path, bases[arch]), row)).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_mixed_predict_answers_as_ptv2_predict_does(tmp_path, bases, arch):
    specs = [("seq-cls", "ptv2", 3), ("seq-cls", "prompt-tuning", 2), ("token-cls", "ptv2", 4)]
    served, bank = _bank(tmp_path, bases[arch], specs)
    tok = tiny_tokenizer()
    inputs = [(f"p{i}", t) for t in TEXTS for i in range(len(specs))]
    rows = [sv.encode_predict(served, bank.get(name), text) for name, text in inputs]
    results = sv.predict(served, rows)
    for (name, text), got in zip(inputs, results, strict=True):
        model = alone(bank.get(name).path, bases[arch])
        want = predict_alone(model, tok, [text])[0]
        if model.task.name == "seq-cls":
            assert got["label"] == want["label"]
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        else:
            assert (got["tokens"], got["tags"]) == (want["tokens"], want["tags"])
            assert got["entities"] == _spans(got["tokens"], got["tags"])


def _spans(words, tags):
    """BIO entities written out by hand (an I- after O opens one too, as seqeval reads them)."""
    out = []
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        if tag.startswith("B-") or i == 0 or tags[i - 1] == "O":
            out.append({"type": tag[2:], "start": i, "end": i + 1, "text": words[i]})
        else:
            out[-1]["end"] = i + 1
            out[-1]["text"] += " " + words[i]
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_generation_equals_each_prompt_alone(tmp_path, bases, arch):
    """Greedy, token for token against transformers' generate on the prompt alone, with the
    stored template, a stop string, and rows that end (and leave the batch) at different steps."""
    base_dir = bases[arch]
    served = sv.ServedBase.load(base_dir)
    bank = sv.PromptBank(served)
    for i, (method, length, template) in enumerate(
        [("ptv2", 2, None), ("ptv2", 7, "w30 {prompt} w31"), ("prompt-tuning", 4, None)]
    ):
        bank.load(
            f"g{i}", make_prompt(tmp_path / f"g{i}", base_dir, "causal-lm", method, length, seed=i, template=template)
        )
    tok = tiny_tokenizer()
    cases = [(f"g{i}", text, 3 + 4 * k) for k, text in enumerate(TEXTS[:3]) for i in range(3)]
    want = {c: generate_alone(alone(bank.get(c[0]).path, base_dir), tok, [c[1]], max_new_tokens=c[2])[0] for c in cases}
    rows = [gen.encode_generate(served, bank.get(n), t, max_new_tokens=m) for n, t, m in cases]
    got = gen.generate(served, rows)
    assert [g.text for g in got] == [want[c] for c in cases]
    assert any(g.finish_reason == "length" for g in got) and all(g.prompt_tokens > 0 for g in got)
    # a stop string cuts each row's text where it first appears (and only that row's)
    long = [(c, want[c]) for c in cases if len(want[c].split()) >= 3]
    assert long, "no continuation long enough to test a stop string"
    (name, text, n), full = long[0]
    stop = full.split()[1]
    rows = [gen.encode_generate(served, bank.get(name), text, max_new_tokens=n, stop=[stop])] + rows
    got = gen.generate(served, rows)
    assert got[0].text == full[: full.find(stop)] and got[0].finish_reason == "stop"
    assert [g.text for g in got[1:]] == [want[c] for c in cases]


def test_sampling_depends_on_the_seed_not_on_the_batch(tmp_path, bases):
    served, bank = _bank(tmp_path, bases["llama"], [("causal-lm", "ptv2", 3), ("causal-lm", "prompt-tuning", 2)])

    def row(name, seed):
        return gen.encode_generate(
            served, bank.get(name), "w1 w2", max_new_tokens=12, temperature=1.5, top_k=40, seed=seed
        )

    alone_7 = gen.generate(served, [row("p0", 7)])[0].token_ids
    mixed = gen.generate(served, [row("p1", 1), row("p0", 7), row("p0", 8)])
    assert mixed[1].token_ids == alone_7
    assert mixed[2].token_ids != alone_7


def test_a_row_that_cannot_be_sampled_fails_alone_and_tiny_temperatures_are_greedy(tmp_path, bases, monkeypatch):
    """temperature=1e-39 once made the logits inf and torch.multinomial raise for the whole mixed
    batch: it is greedy now. A row whose sampling still fails ends alone with its error; the
    rows beside it are answered as if it had not been there."""
    served, bank = _bank(tmp_path, bases["llama"], [("causal-lm", "ptv2", 3), ("causal-lm", "ptv2", 2)])

    def row(name, **sampling):
        return gen.encode_generate(served, bank.get(name), "w1 w2", max_new_tokens=6, **sampling)

    greedy = gen.generate(served, [row("p0")])[0].token_ids
    assert gen.generate(served, [row("p0", temperature=1e-39, seed=1)])[0].token_ids == greedy
    with pytest.raises(sv.BadInput, match="temperature"):
        row("p0", temperature=float("nan"))
    others = gen.generate(served, [row("p1"), row("p0", temperature=0.7, seed=3)])
    real = torch.multinomial

    def broken(probs, *args, **kwargs):  # what a NaN from a broken prompt did to multinomial
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    monkeypatch.setattr(torch, "multinomial", broken)
    got = gen.generate(served, [row("p1"), row("p0", temperature=0.7, seed=3), row("p0")])
    monkeypatch.setattr(torch, "multinomial", real)
    assert got[1].finish_reason == "error" and "probability tensor" in got[1].error
    assert got[0].token_ids == others[0].token_ids and got[2].token_ids == greedy


# ---- the bank --------------------------------------------------------------------------------------
def test_a_prompt_for_another_base_is_refused_naming_both_fingerprints(tmp_path, bases):
    other = save_base(tmp_path / "other", "llama", seed=1)  # same architecture, other weights
    served = sv.ServedBase.load(bases["llama"])
    bank = sv.PromptBank(served)
    path = make_prompt(tmp_path / "foreign", other, "seq-cls")
    want = json.loads((path / MANIFEST).read_text())["base_model"]["fingerprint"]["weights_sha256"][:12]
    with pytest.raises(ArtifactError, match="another base model") as e:
        bank.load("foreign", path)
    msg = str(e.value)
    assert want in msg and str(other) in msg and str(bases["llama"]) in msg and "weights differ" in msg
    assert len([w for w in msg.split() if w.startswith("(fingerprint")]) == 2
    bert_prompt = make_prompt(tmp_path / "bert", bases["bert"], "seq-cls")
    with pytest.raises(ArtifactError, match="model_type: prompt was trained with 'bert', model has 'llama'"):
        bank.load("bert", bert_prompt)
    assert len(bank) == 0


def test_a_tampered_prompt_is_refused_and_a_failed_replacement_keeps_the_old_one(tmp_path, bases):
    served = sv.ServedBase.load(bases["bert"])
    bank = sv.PromptBank(served)
    good = make_prompt(tmp_path / "good", bases["bert"], "seq-cls", seed=1)
    bank.load("p", good)
    before = bank.get("p")
    bad = make_prompt(tmp_path / "bad", bases["bert"], "seq-cls", seed=2)
    data = bytearray((bad / FOLDED).read_bytes())
    data[-5] ^= 1
    (bad / FOLDED).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        bank.load("p", bad)
    assert bank.get("p") is before


def test_the_bank_evicts_the_least_recently_used_past_its_count_and_bytes(tmp_path, bases):
    served = sv.ServedBase.load(bases["llama"])
    paths = [make_prompt(tmp_path / f"p{i}", bases["llama"], "causal-lm", length=4, seed=i) for i in range(4)]
    bank = sv.PromptBank(served, max_prompts=2)
    bank.load("a", paths[0])
    bank.load("b", paths[1])
    bank.get("a")  # b is now the least recently used
    _, evicted = bank.load("c", paths[2])
    assert evicted == ["b"] and bank.names() == ["a", "c"]
    one = bank.get("a").nbytes
    assert one == 2 * 2 * 2 * 4 * 8 * 4  # layers · k/v · kv_heads · P · head_dim · fp32
    by_bytes = sv.PromptBank(served, max_prompts=10, max_bytes=2 * one)
    for name, path in zip("xyz", paths, strict=False):
        by_bytes.load(name, path)
    assert by_bytes.names() == ["y", "z"] and by_bytes.nbytes == 2 * one
    with pytest.raises(ArtifactError, match="over the bank's"):
        sv.PromptBank(served, max_bytes=one - 1).load("big", paths[3])
    with pytest.raises(sv.UnknownPrompt, match="no prompt 'b' is loaded; loaded: a, c"):
        bank.get("b")
    with pytest.raises(sv.ServingError, match="prompt name '../x' is not valid"):
        bank.load("../x", paths[0])


def test_bad_inputs_are_refused_by_name(tmp_path, bases):
    served, bank = _bank(
        tmp_path, bases["llama"], [("seq-cls", "ptv2", 3), ("causal-lm", "ptv2", 3), ("token-cls", "ptv2", 2)]
    )
    cls, lm, tag = bank.get("p0"), bank.get("p1"), bank.get("p2")
    with pytest.raises(sv.BadInput, match="empty input"):
        sv.encode_predict(served, cls, "   ")
    with pytest.raises(sv.BadInput, match="empty input"):
        sv.encode_predict(served, tag, [])
    with pytest.raises(sv.BadInput, match="seq-cls classifies a text, not a list of words"):
        sv.encode_predict(served, cls, ["w1", "w2"])
    with pytest.raises(sv.WrongTask, match="'p1' is a causal-lm prompt; predict needs seq-cls or token-cls"):
        sv.encode_predict(served, lm, "w1")
    with pytest.raises(sv.WrongTask, match="generate needs causal-lm"):
        gen.encode_generate(served, cls, "w1")
    long = " ".join(["w5"] * 200)  # tiny llama: 128 positions
    with pytest.raises(
        sv.InputTooLong, match="input is 200 tokens; prompt 'p0' takes at most 125 \\(or set truncate\\)"
    ):
        sv.encode_predict(served, cls, long, truncate=False)
    assert len(sv.encode_predict(served, cls, long).ids) == 125  # cut, as ptv2 predict does
    with pytest.raises(sv.InputTooLong, match="leaves room for 125"):
        gen.encode_generate(served, lm, long)
    with pytest.raises(sv.BadInput, match="max_new_tokens must be at least 1"):
        gen.encode_generate(served, lm, "w1", max_new_tokens=0)
    with pytest.raises(sv.BadInput, match="top_p"):
        gen.encode_generate(served, lm, "w1", top_p=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_heads_never_share_weights_while_prompts_load_on_other_threads(tmp_path, bases, arch):
    """Predictions run their heads outside the model's lock while other threads load prompts (an
    eviction's reload, POST /v1/prompts, an alias moving): nothing a prompt uses may be a module
    other prompts write into. Every answer equals the prompt alone, and each prompt's head still
    holds exactly its artifact's tensors afterwards."""
    import threading

    from safetensors.torch import load_file

    served, bank = _bank(tmp_path, bases[arch], [("seq-cls", "ptv2", 3), ("seq-cls", "ptv2", 2)])
    extra = [make_prompt(tmp_path / f"x{i}", bases[arch], "seq-cls", "ptv2", 2, seed=10 + i) for i in range(3)]
    rows = [sv.encode_predict(served, bank.get(name), t) for t in TEXTS for name in ("p0", "p1")]
    want = [_alone_logits(alone(r.prompt.path, bases[arch]), r) for r in rows]
    stop, errors = threading.Event(), []

    def load_others() -> None:
        i = 0
        while not stop.is_set():
            bank.load(f"x{i % 3}", extra[i % 3])
            i += 1

    loader = threading.Thread(target=load_others)
    loader.start()
    try:
        for _ in range(40):
            for row, got, expected in zip(rows, sv.predict_logits(served, rows), want, strict=True):
                if float((got - expected).abs().max()) >= 1e-5:
                    errors.append(row.prompt.name)
    finally:
        stop.set()
        loader.join()
    assert not errors
    for name in ("p0", "p1", "x0"):
        prompt = bank.get(name)
        saved = load_file(prompt.path / FOLDED)
        own = {f"head.{prompt.head.name}.{k}": v for k, v in prompt.head.module.state_dict().items()}
        assert own.keys() <= saved.keys() and all(torch.equal(v, saved[k]) for k, v in own.items())
