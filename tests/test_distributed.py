"""DeepSpeed on 2 CPU ranks over gloo (torchrun): partitioning, optimizer contents, frozen
weights, reload equivalence, and exact resume after a killed worker or a truncated checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import write_spec
from tests.tiny import save_tiny

pytestmark = [pytest.mark.slow, pytest.mark.dist]
WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parent.parent


ALL_PARTITIONED = {"stage3_param_persistence_threshold": 0}  # tiny weights too: partitioning is what is tested


def _job(tmp: Path, arch: str, task: str, labels=None, **train) -> Path:
    return write_spec(
        tmp,
        task,
        arch,
        labels,
        n_train=96,
        n_dev=32,
        name=None,
        train={"max_steps": 24, "lr": 0.1, "eval_every": 12, "checkpoint_every": 4, **train},
        deepspeed={
            "config": "zero3.json",
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
        storage="out",
    )


def torchrun(job: Path, report: Path, *extra: str, env: dict | None = None, check: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(job),
        str(report),
        *extra,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=job.parent, env=full_env, capture_output=True, text=True, timeout=300)
    if check and not report.is_file():
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _losses(report: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in report.with_suffix(".losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize(
    "arch,task,labels",
    [("llama", "causal-lm", None), ("bert", "seq-cls", ["even", "odd"])],
)
def test_zero3_two_ranks_trains_only_the_prompt(tmp_path, arch, task, labels):
    job = _job(tmp_path, arch, task, labels)
    report = tmp_path / "report.json"
    torchrun(job, report, "--checks")
    r = json.loads(report.read_text())
    assert r["partitioned"] and r["partition_fraction"] == pytest.approx(0.5, abs=0.02)
    assert r["optimizer_holds_only_trainable"]
    assert r["optimizer_numel"] == r["trainable_numel"]
    # AdamW's two moments for this rank's half of the trainable values
    assert r["optimizer_state_numel_this_rank"] == pytest.approx(r["trainable_numel"], rel=0.05)
    assert r["frozen_unchanged"] and r["frozen_compared"] > 10
    assert r["reload_max_abs_diff"] < 1e-5
    losses = list(_losses(report).values())
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    if task == "seq-cls":
        assert {"accuracy", "macro_f1"} <= set(r["metrics"])
    assert (tmp_path / "out" / "prompt" / "manifest.json").is_file()
    assert (tmp_path / "out" / "best" / "manifest.json").is_file()


def test_the_head_can_take_its_own_learning_rate(tmp_path):
    job = _job(
        tmp_path,
        "bert",
        "seq-cls",
        ["even", "odd"],
        max_steps=2,
        eval_every=0,
        checkpoint_every=0,
        schedule="constant",
        lr=0.01,
        head_lr=0.5,
    )
    torchrun(job, tmp_path / "report.json")
    r = json.loads((tmp_path / "report.json").read_text())
    (lr_prompt, n_prompt), (lr_head, n_head) = r["groups"]
    assert (lr_prompt, lr_head) == (0.01, 0.5)
    assert n_head == r["head_numel"] > 0 and n_prompt == 4 * 2 * 2 * 32  # length 4, 2 layers, K and V


def test_killed_worker_and_truncated_checkpoint_resume_the_same_trajectory(tmp_path):
    job = _job(tmp_path, "llama", "causal-lm", max_steps=12)
    reference = tmp_path / "a" / "report.json"
    reference.parent.mkdir()
    spec = yaml.safe_load(job.read_text())
    spec["storage"] = "a/out"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    torchrun(tmp_path / "a.yaml", reference)
    expected = _losses(reference)

    # rank 1 dies at step 6; the rerun resumes from the step-4 checkpoint
    report = tmp_path / "report.json"
    proc = torchrun(job, report, env={"FAIL_AT_STEP": "6"}, check=False)
    assert proc.returncode != 0 and not report.exists()
    assert "test failure injected: rank 1 exits at step 6" in proc.stdout + proc.stderr
    report.with_suffix(".losses.jsonl").unlink()
    proc = torchrun(job, report, env={"FAIL_AT_STEP": "6"})
    assert "resumed from checkpoint step-00000004 (step 4)" in proc.stdout
    resumed = _losses(report)
    assert sorted(resumed) == list(range(5, 13))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step

    # a truncated newest checkpoint is detected and the previous one used
    ckpts = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000008"]
    victim = next(ckpts[-1].rglob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    report.unlink()
    report.with_suffix(".losses.jsonl").unlink()
    proc = torchrun(job, report)
    assert "skipping checkpoint step-00000008" in proc.stdout and "checksum" in proc.stdout
    assert "resumed from checkpoint step-00000004" in proc.stdout
    assert _losses(report) == pytest.approx({s: expected[s] for s in range(5, 13)}, rel=1e-5)

    # no usable checkpoint at all (an interrupted first save: a rank's marker missing; the
    # other truncated): every rank agrees to start from step 1 and reproduces the whole run
    ckpts = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    (ckpts[0] / "COMPLETE-rank1.json").unlink()
    victim = next(ckpts[-1].rglob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    report.unlink()
    report.with_suffix(".losses.jsonl").unlink()
    proc = torchrun(job, report)
    assert "skipping checkpoint step-00000004: incomplete (no marker from rank(s) 1)" in proc.stdout
    assert "no complete checkpoint: starting from the beginning" in proc.stdout
    assert "resumed from" not in proc.stdout
    assert _losses(report) == pytest.approx(expected, rel=1e-5)


def test_early_stopping_keeps_its_patience_across_a_resume_and_ends_on_the_best_prompt(tmp_path):
    # no later evaluation beats the first by 1e9: the best is step 2's, patience runs out at step 6.
    # Rank 1 dies at step 5, after the step-4 checkpoint (one evaluation without improvement).
    job = _job(
        tmp_path,
        "llama",
        "causal-lm",
        max_steps=24,
        eval_every=2,
        early_stopping={"patience": 2, "min_delta": 1e9},
    )
    report = tmp_path / "report.json"
    proc = torchrun(job, report, env={"FAIL_AT_STEP": "5"}, check=False)
    assert proc.returncode != 0 and not report.exists()
    report.with_suffix(".losses.jsonl").unlink()
    proc = torchrun(job, report, env={"FAIL_AT_STEP": "5"})
    assert "resumed from checkpoint step-00000004 (step 4)" in proc.stdout
    r = json.loads(report.read_text())
    assert r["steps"] == 6 and "in 2 evaluations after its best" in r["stopped"] and "at step 2" in r["stopped"]
    assert sorted(_losses(report)) == [5, 6]  # nothing trained after the stop
    # the final prompt is the best evaluation's, restored from storage (the resumed run never held it)
    final = load_file(tmp_path / "out" / "prompt" / "trainable.safetensors")
    best = load_file(tmp_path / "out" / "best" / "trainable.safetensors")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    manifests = [json.loads((tmp_path / "out" / d / "manifest.json").read_text())["extra"] for d in ("prompt", "best")]
    assert manifests[0] == manifests[1] and manifests[0]["step"] == 2


@pytest.mark.parametrize(
    "config,init,packed",
    [("zero2.json", "text", False), ("replicated.json", "vocab", True), ("zero3_offload.json", "normal", False)],
)
def test_other_deepspeed_configs_give_the_same_training(tmp_path, config, init, packed):
    """Same losses whatever the config; the token inits run the frozen model layer by layer
    gathered under ZeRO-3 and must start the prompt exactly where the unpartitioned model does.
    Packed rows with activation checkpointing under ZeRO-3 train as packed rows replicated."""
    job = _job(tmp_path, "llama", "causal-lm", max_steps=6, checkpoint_every=0, eval_every=0)
    spec = yaml.safe_load(job.read_text())
    spec["prompt"]["init"] = init
    if packed:
        spec["data"]["packing"] = True
        spec["train"]["gradient_checkpointing"] = True
    job.write_text(yaml.safe_dump(spec))
    proc = torchrun(job, tmp_path / "z3.json")
    assert ("packed=" in proc.stdout) == packed and ("gradient_checkpointing=True" in proc.stdout) == packed
    spec["deepspeed"] = {"config": config}
    spec["storage"] = "out2"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(spec))
    torchrun(tmp_path / "other.yaml", tmp_path / "other.json")
    assert _losses(tmp_path / "other.json") == pytest.approx(_losses(tmp_path / "z3.json"), rel=1e-4)


def test_layer_gathers_and_activation_checkpointing_train_as_before(tmp_path):
    """zero3.json gathers each layer as one unit (leaf modules) straight into its parameters; with
    activation checkpointing on top, every layer is recomputed in the backward under ZeRO-3. The
    losses equal the pre-change path (per-module fetches, coalesced gathers, no recompute) and the
    frozen weights stay bit-identical to the checkpoint on disk."""
    job = _job(tmp_path, "llama", "causal-lm", max_steps=6, checkpoint_every=0, eval_every=0)
    spec = yaml.safe_load(job.read_text())
    before = {"leaf_module": {"classes": []}, "stage3_allgather_sequential": False}
    spec["deepspeed"]["overrides"]["zero_optimization"].update(before)
    spec["storage"] = "before"
    (tmp_path / "before.yaml").write_text(yaml.safe_dump(spec))
    torchrun(tmp_path / "before.yaml", tmp_path / "before.json")
    spec = yaml.safe_load(job.read_text())
    spec["train"]["gradient_checkpointing"] = True
    job.write_text(yaml.safe_dump(spec))
    proc = torchrun(job, tmp_path / "after.json", "--checks")
    assert "gradient_checkpointing=True" in proc.stdout and "deepspeed_config=zero3.json" in proc.stdout
    r = json.loads((tmp_path / "after.json").read_text())
    assert r["frozen_unchanged"] and r["frozen_compared"] > 10 and r["partitioned"]
    assert r["reload_max_abs_diff"] < 1e-5
    assert _losses(tmp_path / "after.json") == pytest.approx(_losses(tmp_path / "before.json"), rel=1e-5)


def test_single_process_mode(tmp_path):
    job = _job(tmp_path, "gpt2", "causal-lm", max_steps=4, checkpoint_every=2, eval_every=0)
    proc = subprocess.run(
        [sys.executable, "-m", "ptv2.train", str(job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workers=1 zero_stage=3" in proc.stdout
    assert (tmp_path / "out" / "prompt" / "manifest.json").is_file()


def test_zero3_loading_reads_each_ranks_partition_from_the_checkpoint(tmp_path):
    """Under ZeRO-3 each rank fills its own partitions from the safetensors files (a sharded
    checkpoint; a base-model checkpoint under a classifier, whose new head is initialised), and
    every gathered weight equals the checkpoint's, bit for bit."""
    from transformers import AutoModel, AutoModelForCausalLM

    from tests.tiny import tiny_config

    save_tiny(tmp_path / "llama", "llama", "causal-lm")
    AutoModelForCausalLM.from_pretrained(tmp_path / "llama").save_pretrained(
        tmp_path / "llama-sharded", max_shard_size="20KB"
    )
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(tmp_path / "bert-base-model")  # keys without "bert."
    shutil.copytree(tmp_path / "llama", tmp_path / "llama-wrong-shape")
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"  # [32, 64]: stored as [64, 32], as many values
    weights[key] = weights[key].T.contiguous()
    save_file(weights, tmp_path / "llama-wrong-shape" / "model.safetensors", metadata={"format": "pt"})
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "dist_loading.py"),
            str(tmp_path),
            str(report),
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.is_file(), (proc.stdout + proc.stderr)[-3000:]
    r = json.loads(report.read_text())
    assert len(list((tmp_path / "llama-sharded").glob("model-*.safetensors"))) > 2
    for case in ("llama-sharded", "bert-base-model"):
        assert r[case]["streamed"] and r[case]["partitioned"] and r[case]["equal"] and r[case]["compared"] > 10, r
    assert r["llama-sharded"]["missing"] == []
    assert r["bert-base-model"]["missing"] == ["classifier.bias", "classifier.weight"]
    assert (
        f"{key}: the checkpoint's tensor has shape [64, 32], the model's parameter [32, 64]"
        in (r["llama-wrong-shape"]["error"])
    )
