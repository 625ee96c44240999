"""The training loop's parts: DeepSpeed config filling, data templates and bad rows, metrics
that count each example once across ranks, the learning-rate schedule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ptv2 import checkpoint, dsconfig
from ptv2.data import BatchStream, DataError, collator, load_examples
from ptv2.evaluate import evaluate, shard
from ptv2.settings import DataSettings, TrainJob
from ptv2.tasks import IGNORE_INDEX, task_of
from ptv2.tasks.causal_lm import join_generation
from ptv2.tasks.tagging import entity_spans
from ptv2.trainee import SCHEDULES
from tests.tiny import tiny_tokenizer


def _job(**over) -> TrainJob:
    spec = {
        "model": {"name_or_path": "m", "task": "causal-lm"},
        "data": {"train_file": "t.jsonl"},
        "train": {"micro_batch_size": 4, "gradient_accumulation": 3, "max_grad_norm": 0.5},
    }
    for k, v in over.items():
        spec[k] = v
    return TrainJob.model_validate(spec)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json", "replicated.json"])
def test_every_shipped_config_is_filled_from_the_job(name):
    cfg = dsconfig.build(_job(deepspeed={"config": name}), world_size=2, dtype="bfloat16")
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)


def test_overrides_merge_but_cannot_duplicate_job_values():
    cfg = dsconfig.build(
        _job(
            deepspeed={
                "config": "zero3.json",
                "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
            }
        ),
        1,
        "float32",
    )
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["zero_optimization"]["stage"] == 3 and dsconfig.zero_stage(cfg) == 3
    with pytest.raises(dsconfig.DeepSpeedConfigError, match="train_micro_batch_size_per_gpu is set from the job"):
        dsconfig.build(_job(deepspeed={"overrides": {"train_micro_batch_size_per_gpu": 2}}), 1, "float32")
    with pytest.raises(dsconfig.DeepSpeedConfigError, match=r"bf16.enabled is set from the job: use model.dtype"):
        dsconfig.build(_job(deepspeed={"overrides": {"bf16": {"enabled": True}}}), 1, "float32")
    with pytest.raises(dsconfig.DeepSpeedConfigError, match="neither a file nor one of deepspeed_configs/"):
        dsconfig.build(_job(deepspeed={"config": "zero9.json"}), 1, "float32")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generation_template_puts_loss_on_the_response_only(tmp_path):
    tok = tiny_tokenizer()
    f = _write(tmp_path / "g.jsonl", [{"prompt": "w1 w2 w3", "response": "w4 w5"}])
    [ex] = load_examples(f, DataSettings(train_file=str(f), prompt_template="w9 {prompt}"), "causal-lm", None, tok)
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["w9", "w1", "w2", "w3", "w4", "w5", "[EOS]"]
    assert ex["labels"] == [IGNORE_INDEX] * 4 + ex["input_ids"][4:]


def test_tagging_labels_only_first_subtokens_and_classification_maps_labels(tmp_path):
    tok = tiny_tokenizer()
    f = _write(tmp_path / "n.jsonl", [{"tokens": ["w1", "w2"], "tags": ["B-x", "O"]}])
    [ex] = load_examples(f, DataSettings(train_file=str(f)), "token-cls", ["O", "B-x", "I-x"], tok)
    assert ex["labels"] == [1, 0]
    f = _write(tmp_path / "c.csv", [])
    f.write_text("text,label\nw1 w2,pos\nw3,neg\n")
    exs = load_examples(f, DataSettings(train_file=str(f)), "seq-cls", ["neg", "pos"], tok)
    assert [e["labels"] for e in exs] == [1, 0]


def test_bad_rows_are_reported_with_file_and_row(tmp_path):
    tok = tiny_tokenizer()
    rows = [
        {"text": "w1", "label": "pos"},
        {"text": "", "label": "pos"},
        {"text": "w2", "label": "maybe"},
        {"text": "w3", "label": None},
    ]
    f = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(f, DataSettings(train_file=str(f)), "seq-cls", ["neg", "pos"], tok)
    msg = str(e.value)
    assert "3 bad row(s)" in msg
    assert f"{f}:row 2: empty text" in msg
    assert f"{f}:row 3: unknown label 'maybe'" in msg
    assert f"{f}:row 4: missing label" in msg
    with pytest.raises(DataError, match=r"missing column\(s\) label"):
        load_examples(
            _write(tmp_path / "x.jsonl", [{"text": "w1"}]), DataSettings(train_file="x"), "seq-cls", ["a", "b"], tok
        )
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl", DataSettings(train_file="x"), "seq-cls", ["a", "b"], tok)
    f = _write(tmp_path / "n.jsonl", [{"tokens": ["w1", "w2"], "tags": ["O"]}])
    with pytest.raises(DataError, match="row 1: 2 tokens but 1 tags"):
        load_examples(f, DataSettings(train_file=str(f)), "token-cls", ["O", "B-x"], tok)


def test_collators_pad_dynamically():
    tok = tiny_tokenizer()
    b = collator(tok, "seq-cls")(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
            {"input_ids": [5], "attention_mask": [1], "labels": 0},
        ]
    )
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    for task in ("token-cls", "causal-lm"):
        b = collator(tok, task)(
            [
                {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [1, 2]},
                {"input_ids": [5], "attention_mask": [1], "labels": [3]},
            ]
        )
        assert b["input_ids"].tolist() == [[5, 6], [5, 0]] and b["labels"].tolist() == [[1, 2], [3, IGNORE_INDEX]]


def test_a_tokenizer_without_pad_borrows_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    b = collator(tok, "causal-lm")([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [5], "labels": [5]}])
    assert b["input_ids"].tolist() == [[5, 6], [5, tok.eos_token_id]]


@pytest.mark.parametrize(
    "prompt,response,keep_prompt,keep_response,eos",
    [
        (3, 2, 3, 2, True),  # fits: nothing cut
        (20, 2, 9, 2, True),  # long prompt: loses its start, the reply keeps its EOS
        (3, 20, 3, 9, False),  # long reply: the prompt stays whole, the reply is cut and has no EOS
        (20, 20, 6, 6, False),  # both long: half each, the reply cut (no EOS)
    ],
)
def test_truncation_keeps_the_prompt_end_and_the_response_start(prompt, response, keep_prompt, keep_response, eos):
    p, r, EOS = list(range(100, 100 + prompt)), list(range(200, 200 + response)), 2
    ex = join_generation(p, r, EOS, max_length=12)
    ids = ex["input_ids"]
    assert len(ids) <= 12
    n_prompt = sum(lab == IGNORE_INDEX for lab in ex["labels"])
    assert ids[:n_prompt] == p[len(p) - keep_prompt :]
    reply = ids[n_prompt:]
    assert reply[: min(keep_response, len(r))] == r[:keep_response]
    assert (reply[-1] == EOS) is eos and len(reply) == keep_response + eos
    assert ex["labels"][n_prompt:] == reply


def test_null_labels_are_bad_rows_reported_before_training(tmp_path):
    tok = tiny_tokenizer()
    f = _write(tmp_path / "g.jsonl", [{"prompt": "w1", "response": "w2"}, {"prompt": "w3", "response": None}])
    with pytest.raises(DataError, match=rf"{f}:row 2: missing response"):
        load_examples(f, DataSettings(train_file=str(f)), "causal-lm", None, tok)
    f = _write(tmp_path / "t.jsonl", [{"tokens": ["w1"], "tags": ["O"]}, {"tokens": ["w1", "w2"], "tags": None}])
    with pytest.raises(DataError, match=rf"{f}:row 2: missing tags"):
        load_examples(f, DataSettings(train_file=str(f)), "token-cls", ["O", "B-x"], tok)


def test_batch_stream_gives_every_rank_equal_disjoint_shards_and_resumes_anywhere():
    data = [{"input_ids": [i]} for i in range(7)]
    streams = [BatchStream(data, 2, rank, 2, seed=3) for rank in range(2)]
    assert streams[0].per_epoch == 2
    epoch = [[next(it) for _ in range(2)] for it in (s.from_micro(0) for s in streams)]
    seen = [ex["input_ids"][0] for rank in epoch for batch in rank for ex in batch]
    assert len(seen) == 8 and set(seen) == set(range(7))  # all 7 once, plus one repeat to even out
    later = streams[1].from_micro(0)
    for _ in range(5):
        next(later)
    assert next(streams[1].from_micro(5)) == next(later)


def test_every_target_of_a_step_weighs_the_same():
    labels = torch.tensor([[IGNORE_INDEX, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 6]])
    assert task_of("causal-lm").targets({"labels": labels}) == 3  # next-token targets: positions 1.. of the labels
    assert task_of("token-cls").targets({"labels": labels}) == 3
    assert task_of("seq-cls").targets({"labels": torch.tensor([0, 1, 1])}) == 3


def test_entity_spans():
    assert entity_spans(["B-per", "I-per", "O", "B-loc", "B-loc", "I-org"]) == {
        ("per", 0, 2),
        ("loc", 3, 4),
        ("loc", 4, 5),
        ("org", 5, 6),
    }
    assert entity_spans(["O", "O"]) == set()


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (1, 2), (5, 3)])
def test_shards_cover_every_example_once(n, world):
    shards = [shard(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal batch counts: ZeRO-3 forwards are collective
    counted = sorted(i for s in shards for i, valid in s if valid)
    assert counted == list(range(n))


def test_evaluation_counts_each_example_once():
    """Simulate 2 ranks: the padded repeat on rank 1 must not count."""
    examples = [{"input_ids": [3 + i], "attention_mask": [1], "labels": i % 2} for i in range(5)]

    def forward(input_ids, attention_mask):  # predicts class 1 for every input
        return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2))

    import ptv2.evaluate as ev

    totals = []
    orig = ev.all_sum
    ev.all_sum = lambda values, device: totals.append(values) or values
    try:
        for rank in range(2):
            evaluate(
                forward,
                examples,
                "seq-cls",
                ["a", "b"],
                2,
                collator(tiny_tokenizer(), "seq-cls"),
                rank,
                2,
                torch.device("cpu"),
            )
    finally:
        ev.all_sum = orig
    summed = [a + b for a, b in zip(*totals, strict=True)]
    assert summed[1] == 5 and summed[2] == 2  # 5 examples, 2 of class 1 correct


def _over_ranks(world: int, run) -> list[float]:
    """Run `run(rank)` (an evaluate call) for every rank with all_sum replaced by a sum over them."""
    import ptv2.evaluate as ev

    totals = []
    orig = ev.all_sum
    ev.all_sum = lambda values, device: totals.append(values) or values
    try:
        for rank in range(world):
            run(rank)
    finally:
        ev.all_sum = orig
    return [sum(col) for col in zip(*totals, strict=True)]


@pytest.mark.parametrize("method", ["ptv2", "prompt-tuning"])
@torch.no_grad()
def test_causal_lm_eval_scores_labelled_tokens_on_the_device_as_from_full_logits(method):
    """Loss and accuracy from the labelled positions only (the LM head applied there alone, through
    `labelled_stats`) equal those of the full logits over every position, copied to the CPU; over
    2 ranks, the padded repeat excluded."""
    import torch.nn.functional as F

    from ptv2.model import PromptedModel
    from ptv2.settings import PromptConfig
    from tests.helpers import randomize_prompt
    from tests.tiny import tiny_model

    model = PromptedModel(tiny_model("llama"), PromptConfig(method=method, length=3), "causal-lm").eval()
    randomize_prompt(model, scale=0.5)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 7, 8):  # odd count: rank 1 pads with a repeat
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        cut = n // 2
        examples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * cut + ids[cut:]})

    loss_sum = correct = count = 0.0  # the reference: every example alone, full logits on the CPU
    for ex in examples:
        logits = model(torch.tensor([ex["input_ids"]])).logits[0, :-1].float().cpu()
        gold = torch.tensor(ex["labels"][1:])
        keep = gold != IGNORE_INDEX
        loss_sum += F.cross_entropy(logits[keep], gold[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == gold[keep]).sum().item()
        count += keep.sum().item()

    head_rows = []
    hook = model.base.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    cpu, collate = torch.device("cpu"), collator(tiny_tokenizer(), "causal-lm")
    head_rows.clear()
    s = _over_ranks(2, lambda r: evaluate(model, examples, "causal-lm", None, 2, collate, r, 2, cpu))
    assert s[1] == count
    assert s[0] / s[1] == pytest.approx(loss_sum / count, abs=1e-6, rel=1e-6)
    assert s[2] == correct
    assert sum(head_rows) == count  # the LM head saw only the labelled positions (the padded repeat has none)
    hook.remove()


# (gold, predicted) tags per sentence: well-formed BIO, I- without B-, type changes inside an
# entity, entities at both ends, sentences without entities, a sub-token position (None) that
# evaluation ignores, and IOBES single (S-) and end (E-) tags.
NER = [
    (["B-per", "I-per", "O", "B-loc"], ["B-per", "I-per", "O", "B-loc"]),
    (["B-per", "I-per", "I-per", "O"], ["B-per", "I-per", "O", "O"]),
    (["O", "I-org", "I-org", "O"], ["O", "B-org", "I-org", "O"]),
    (["B-loc", "I-loc", "B-loc", "O"], ["B-loc", "I-per", "B-loc", "O"]),
    (["O", "O", "O"], ["B-misc", "O", "I-misc"]),
    (["B-org", None, "I-org", "O", "B-per"], ["B-org", "O", "I-org", "O", "I-per"]),
    (["O", "O"], ["O", "O"]),
    (["B-misc", "I-misc", "I-misc", "I-misc", "B-misc"], ["I-misc", "I-misc", "B-misc", "I-misc", "B-misc"]),
    (["S-per", "O", "B-loc", "E-loc"], ["S-per", "O", "B-loc", "I-loc"]),  # IOBES tags, as conlleval reads them
]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_entity_scores_across_ranks_equal_seqeval(world):
    """Entity precision/recall/F1 summed over ranks equal seqeval's micro scores (default mode)
    over the same sentences, whatever the number of ranks (and padded repeats)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    names = ["O", "B-per", "I-per", "B-loc", "I-loc", "B-org", "I-org", "B-misc", "I-misc", "S-per", "E-loc"]
    examples, preds = [], []
    for i, (gold, pred) in enumerate(NER):
        ids = [10 + i] * len(gold)  # the first id tells the fake model which sentence it reads
        labels = [IGNORE_INDEX if t is None else names.index(t) for t in gold]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        preds.append([names.index(t) for t in pred])

    def forward(input_ids, attention_mask):  # logits whose argmax is the sentence's prediction
        out = torch.zeros(*input_ids.shape, len(names))
        for b, row in enumerate(input_ids):
            out[b, torch.arange(len(preds[row[0] - 10])), torch.tensor(preds[row[0] - 10])] = 1.0
        return SimpleNamespace(logits=out)

    import ptv2.evaluate as ev

    collate = collator(tiny_tokenizer(), "token-cls")

    def run(rank: int) -> dict[str, float]:
        return evaluate(forward, examples, "token-cls", names, 3, collate, rank, world, torch.device("cpu"))

    orig, per_rank = ev.all_sum, []
    try:
        ev.all_sum = lambda values, device: per_rank.append(values) or values
        for rank in range(world):
            run(rank)
        summed = [sum(col) for col in zip(*per_rank, strict=True)]
        ev.all_sum = lambda values, device: summed  # what the all-reduce hands every rank
        metrics = run(0)
    finally:
        ev.all_sum = orig
    gold_tags = [[t for t in g if t is not None] for g, _ in NER]
    pred_tags = [[p for g, p in zip(gold, pred, strict=True) if g is not None] for gold, pred in NER]
    assert metrics["entity_precision"] == pytest.approx(precision_score(gold_tags, pred_tags), abs=1e-12)
    assert metrics["entity_recall"] == pytest.approx(recall_score(gold_tags, pred_tags), abs=1e-12)
    assert metrics["entity_f1"] == pytest.approx(f1_score(gold_tags, pred_tags), abs=1e-12)
    assert 0 < metrics["entity_f1"] < 1


def test_schedules_are_transformers_own_with_warmup():
    from transformers import get_scheduler

    for name, hf_name in SCHEDULES.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(hf_name, opt, num_warmup_steps=4, num_training_steps=14)
        lrs = []
        for _ in range(14):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]), name  # warmup for every schedule
        assert (lrs[-1] < 0.2) is (name != "constant"), name


def test_rng_state_round_trips_as_tensors_without_pickle(tmp_path):
    import random

    import numpy as np
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    save_file(checkpoint.rng_tensors(), tmp_path / "rng.safetensors")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_tensors(load_file(tmp_path / "rng.safetensors"))
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item()) == expected


def test_a_checkpoint_counts_only_with_every_ranks_intact_files(tmp_path):
    import json as js

    for rank in range(2):
        (tmp_path / f"f{rank}").write_text(f"rank {rank}")
        marker = {
            "step": 4,
            "rank": rank,
            "world_size": 2,
            "files": {f"f{rank}": checkpoint.sha256_file(tmp_path / f"f{rank}")},
        }
        (tmp_path / checkpoint.marker_name(rank)).write_text(js.dumps(marker))
    (tmp_path / checkpoint.STATE).write_text("{}")
    assert checkpoint.verify(tmp_path, 2) is None
    assert checkpoint.verify(tmp_path, 3) == "incomplete (no marker from rank(s) 2)"
    (tmp_path / "f1").write_text("rank 1, changed")
    assert "f1 does not match its checksum" in checkpoint.verify(tmp_path, 2)
    (tmp_path / checkpoint.marker_name(1)).unlink()
    assert checkpoint.verify(tmp_path, 2) == "incomplete (no marker from rank(s) 1)"


def _fake_checkpoint(folder, world: int, step: int = 4) -> str:
    """A checkpoint's files as `world` ranks write them (a stand-in optimizer shard each); returns
    the digest of its markers, as the job's MLflow run records it at the save."""
    import json as js

    folder.mkdir(parents=True)
    (folder / checkpoint.STATE).write_text(checkpoint.RunState(step=step).to_json())
    shas = []
    for rank in range(world):
        shard = folder / "ds" / f"optim_states_rank{rank}.pt"
        shard.parent.mkdir(exist_ok=True)
        shard.write_bytes(b"pickled optimizer state %d" % rank)
        files = {f"ds/{shard.name}": checkpoint.sha256_file(shard)}
        if rank == 0:
            files[checkpoint.STATE] = checkpoint.sha256_file(folder / checkpoint.STATE)
        marker = folder / checkpoint.marker_name(rank)
        marker.write_text(js.dumps({"step": step, "rank": rank, "world_size": world, "files": files}))
        shas.append(checkpoint.sha256_file(marker))
    return checkpoint.markers_digest(shas)


class _NeverLoad:
    """A DeepSpeed engine stand-in: loading anything fails the test (nothing may be unpickled)."""

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("a checkpoint was loaded")


def test_a_resume_loads_only_what_the_runs_record_trusts_and_an_explicit_one_says_why_not(tmp_path):
    """Whoever writes to storage can rewrite a shard and its marker to match: the digest MLflow
    recorded at the save still differs, so the checkpoint is refused before DeepSpeed unpickles
    anything. An explicit resume with nothing to trust fails naming each checkpoint's reason
    instead of starting again from step 0; a plain (automatic) one starts from the beginning."""
    store = tmp_path / "checkpoints"
    recorded = {"step-00000004": _fake_checkpoint(store / "step-00000004", 2)}
    _fake_checkpoint(store / "step-00000008", 1, step=8)  # written by 1 rank: this run has 2
    shard = store / "step-00000004" / "ds" / "optim_states_rank1.pt"
    shard.write_bytes(b"planted code")
    marker = store / "step-00000004" / checkpoint.marker_name(1)
    forged = json.loads(marker.read_text())
    forged["files"][f"ds/{shard.name}"] = checkpoint.sha256_file(shard)
    marker.write_text(json.dumps(forged))
    assert checkpoint.verify(store / "step-00000004", 2) is None  # the files match the (forged) markers
    lines = []
    cps = checkpoint.Checkpoints(str(store), trusted=lambda: recorded)
    with pytest.raises(checkpoint.CheckpointError) as e:
        cps.restore(_NeverLoad(), tmp_path / "scratch", 0, 2, lines.append, required=True)
    assert str(e.value) == (
        "nothing to resume from: step-00000008: incomplete (no marker from rank(s) 1); step-00000004: its files "
        "differ from what the job's MLflow run recorded at its save (changed in storage since)"
    )
    assert cps.restore(_NeverLoad(), tmp_path / "scratch", 0, 2, lines.append) is None
    assert lines[-1] == "no complete checkpoint: starting from the beginning"
    assert checkpoint.verify(store / "step-00000004", 1) == "written by 2 ranks, this run has 1"
    assert "not recorded in the job's MLflow run" in checkpoint.verify(store / "step-00000008", 1, trusted=None)
    with pytest.raises(checkpoint.CheckpointError, match=f"nothing to resume from: {tmp_path / 'none'} holds none"):
        checkpoint.Checkpoints(str(tmp_path / "none")).restore(_NeverLoad(), tmp_path, 0, 1, print, required=True)


def test_text_that_tokenizes_to_nothing_is_a_bad_row(tmp_path):
    """A tokenizer that does not fit the data must stop the job before training, not train on
    empty sequences (a tokenizer that drops every character stands in for it)."""
    import tokenizers

    nothing = tiny_tokenizer()
    nothing.backend_tokenizer.normalizer = tokenizers.normalizers.Replace(tokenizers.Regex(".*"), "")
    assert nothing("w1 w2")["input_ids"] == []
    f = _write(tmp_path / "c.jsonl", [{"text": "w1 w2", "label": "pos"}])
    with pytest.raises(DataError, match=rf"{f}:row 1: tokenizes to no tokens"):
        load_examples(f, DataSettings(train_file=str(f)), "seq-cls", ["neg", "pos"], nothing)
    g = _write(tmp_path / "g.jsonl", [{"prompt": "w1", "response": "w2"}])
    with pytest.raises(DataError, match=rf"{g}:row 1: the response tokenizes to no tokens"):
        load_examples(g, DataSettings(train_file=str(g)), "causal-lm", None, nothing)


def test_a_stale_op_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch waits forever for an op build's lock file: one left by a killed process must go."""
    import os
    import time

    from ptv2.distributed import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks(max_age_s=600) == [stale]
    assert not stale.exists() and fresh.exists()


@pytest.mark.slow
def test_the_set_ups_op_build_is_reused_whichever_ninja_comes_first_on_path():
    """DeepSpeed's CPU op is built once (by `make setup`): a process whose PATH puts a system ninja
    first (or has no venv on it) must reuse that build, not compile it again."""
    import os
    import subprocess
    import sys

    from ptv2.distributed import build_cpu_comm_op, extension_root

    build_cpu_comm_op()  # built here with the environment's ninja (a no-op after `make setup`)
    folder = next(p.parent for p in extension_root().glob("**/deepspeed_shm_comm/*.so"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    env = {**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    code = "from ptv2.distributed import build_cpu_comm_op; build_cpu_comm_op()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()} == before


def test_gradient_accumulation_weighs_every_labelled_token_of_the_step_alike():
    """Two micro-batches with 1 and 5 labelled next-token targets: the step's gradient equals the
    gradient of the mean over all 6 targets, not the mean of the two micro-batch means."""
    from ptv2.distributed import Process
    from ptv2.train import train_step
    from ptv2.trainee import Trainee
    from tests.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama").float()

    class Engine:  # what train_step needs of DeepSpeed's engine, on one process
        def __call__(self, **batch):
            return model(**batch)

        def backward(self, loss, scale_wrt_gas):
            loss.backward()

        def step(self):
            pass

    ids = torch.randint(3, 60, (2, 8))
    short = {"input_ids": ids[:1], "attention_mask": torch.ones(1, 8, dtype=torch.long), "labels": ids[:1].clone()}
    short["labels"][0, :6] = -100  # 1 target (position 7, predicted from 6)
    long = {"input_ids": ids[1:], "attention_mask": torch.ones(1, 8, dtype=torch.long), "labels": ids[1:].clone()}
    long["labels"][0, :2] = -100  # 5 targets
    trainee = Trainee(model, Engine(), None, None, 1, {}, {})
    d = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    loss, _ = train_step(trainee, [short, long], task_of("causal-lm"), d)
    stepped = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logits = torch.cat([model(input_ids=b["input_ids"]).logits[:, :-1] for b in (short, long)], dim=1)
    targets = torch.cat([b["labels"][:, 1:] for b in (short, long)], dim=1)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(stepped, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # and it is not the mean of the micro-batch means, which weighs the single target 5x more
    model.zero_grad()
    means = [model(**b).loss for b in (short, long)]
    assert abs(sum(means).item() / 2 - expected.item()) > 1e-3
