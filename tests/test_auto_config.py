"""`deepspeed.config: auto`: the config is picked by the numbers (frozen model, trainable state,
activations against each rank's memory), the estimate counts the real model from its config, the
chosen file still takes the job's overrides, and it is the default everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers.modeling_layers import GradientCheckpointingLayer as CheckpointedLayer

from ptv2 import dsconfig
from ptv2.dsconfig import HEADROOM, Choice, MemoryEstimate, choose
from ptv2.model import PromptedModel, load_base_model
from ptv2.settings import DeepSpeedSettings, PromptConfig, TrainJob
from tests.tiny import ARCHS, DECODERS, save_tiny, tiny_model

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# a 5B-value bf16 model: 10 GiB frozen, its largest gathered unit 0.5 GiB
EST = MemoryEstimate(
    frozen=10 * GIB, largest_unit=GIB // 2, trainable=GIB // 10, activations=2 * GIB, bytes_per_value=2
)


def _device_for(need: float) -> int:
    """Device bytes whose usable part (less HEADROOM) is exactly `need`."""
    return int(need / (1 - HEADROOM)) + 1


def test_replicated_when_the_whole_frozen_model_fits_with_headroom():
    need = EST.frozen + EST.trainable + EST.activations
    c = choose(EST, _device_for(need), 64 * GIB, world_size=4)
    assert c.config == "replicated.json" and c.zero3_settings is None
    assert "12.10 GiB fits" in c.reason
    # a little less memory and it no longer fits whole: ZeRO-3
    assert choose(EST, _device_for(need) - 2**20, 64 * GIB, world_size=4).config == "zero3.json"


def test_zero3_when_only_a_partition_fits_keeping_what_memory_allows_gathered():
    device = 12 * GIB  # usable 9 GiB: the whole model (12.1) does not fit, a quarter of it does
    c = choose(EST, device, 64 * GIB, world_size=4)
    assert c.config == "zero3.json"
    usable = device * (1 - HEADROOM)
    live = usable - EST.frozen / 4 - EST.trainable - EST.activations  # 4.4 GiB left for gathered layers
    assert c.zero3_settings == {
        "stage3_max_live_parameters": int(live // 2),
        "stage3_max_reuse_distance": int(live // 2),
    }
    assert "ZeRO-3 partition 2.50 GiB" in c.reason and "fits" in c.reason
    # on a CPU that cannot hold even that, it still keeps the two units ZeRO-3 needs at least
    starved = choose(EST, 3 * GIB, 3 * GIB, world_size=4, device_type="cpu")
    assert starved.zero3_settings["stage3_max_live_parameters"] == 2 * EST.largest_unit // 2


def test_offload_when_even_a_partition_does_not_fit_and_never_on_a_cpu():
    device = 5 * GIB  # usable 3.75: partition 2.5 + 2 units 1 + trainable 0.1 + activations 2 = 5.6 do not fit
    c = choose(EST, device, 64 * GIB, world_size=4)
    assert c.config == "zero3_offload.json" and "partitions offloaded to host memory" in c.reason
    assert "gradient_checkpointing" not in c.reason  # what stays on the device (3.1 GiB) fits
    tight = choose(EST, 3 * GIB, 64 * GIB, world_size=4)
    assert tight.config == "zero3_offload.json" and "set train.gradient_checkpointing: true" in tight.reason
    on_cpu = choose(EST, device, device, world_size=4, device_type="cpu")
    assert on_cpu.config == "zero3.json" and "nowhere to offload" in on_cpu.reason


def test_the_choice_and_its_numbers_are_flat_values_for_the_log():
    info = choose(EST, 40 * GIB, 64 * GIB, world_size=2).info()
    assert info["deepspeed_config"] == "replicated.json (auto)"
    assert info["auto_frozen_gib"] == 10.0 and info["auto_device_gib"] == 40.0 and info["auto_activations_gib"] == 2.0
    assert all(isinstance(v, (str, float)) for v in info.values())
    tiny = choose(MemoryEstimate(3 * 2**20, 2**20, 5 * 2**10, 2**20, 4), 8 * GIB, 8 * GIB, 2).info()
    assert tiny["auto_frozen_gib"] == pytest.approx(3 / 1024, rel=1e-3)  # small models do not round to 0
    assert tiny["auto_reason"].startswith("frozen 3.00 MiB + trainable 5.0 KiB + activations 1.00 MiB")


def _job(tmp_path: Path, arch="llama", task="causal-lm", labels=None, **sections) -> TrainJob:
    save_tiny(tmp_path / "model", arch, task, labels)
    spec = {
        "model": {"name_or_path": str(tmp_path / "model"), "task": task, **({"labels": labels} if labels else {})},
        "prompt": {"length": 4},
        "data": {"train_file": "x", "max_length": 32},
        "train": {"micro_batch_size": 8},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return TrainJob.model_validate(spec)


@pytest.mark.parametrize(
    "arch,task,labels",
    [(a, "causal-lm", None) for a in DECODERS] + [(a, "seq-cls", ["a", "b"]) for a in ARCHS if a not in DECODERS],
)
def test_estimate_counts_the_real_model_from_its_config(tmp_path, arch, task, labels):
    job = _job(tmp_path, arch, task, labels)
    est = dsconfig.estimate(job, "float32")
    base, _ = load_base_model(tmp_path / "model", task, labels)
    model = PromptedModel(base, PromptConfig(length=4), task)
    trainable = {n for n, _ in model.trainable_parameters()}
    frozen = sum(p.numel() for n, p in model.named_parameters() if n not in trainable)
    layer = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, CheckpointedLayer))
    assert est.frozen == 4 * frozen and est.bytes_per_value == 4
    assert est.largest_unit == 4 * max(layer, max(p.numel() for p in base.parameters()))
    assert est.trainable == (4 + 4 + 12) * sum(p.numel() for _, p in model.trainable_parameters())
    assert dsconfig.estimate(job, "bfloat16").frozen == 2 * frozen
    checkpointed = dsconfig.estimate(
        job.model_copy(update={"train": job.train.model_copy(update={"gradient_checkpointing": True})}), "float32"
    )
    assert 0 < checkpointed.activations < est.activations
    longer = job.model_copy(update={"data": job.data.model_copy(update={"max_length": 64})})
    assert dsconfig.estimate(longer, "float32").activations > est.activations


def test_auto_builds_the_chosen_file_with_the_overrides_on_top(tmp_path):
    over = {"zero_optimization": {"stage3_max_reuse_distance": 123, "stage3_param_persistence_threshold": 0}}
    job = _job(tmp_path, deepspeed={"config": "auto", "overrides": over})
    zero3 = Choice("zero3.json", "", EST, 0, 0, 2, {"stage3_max_live_parameters": 7, "stage3_max_reuse_distance": 8})
    cfg = dsconfig.build(job, 2, "float32", zero3, device_type="cpu")
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_max_live_parameters"] == 7  # sized by auto
    assert z["stage3_max_reuse_distance"] == 123 and z["stage3_param_persistence_threshold"] == 0  # the job's word
    assert z["stage3_allgather_sequential"] is True  # gloo: gathered straight into each parameter
    assert (
        dsconfig.build(job, 2, "bfloat16", zero3, device_type="cuda")["zero_optimization"][
            "stage3_allgather_sequential"
        ]
        is False
    )
    replicated = dsconfig.build(job, 2, "float32", Choice("replicated.json", "", EST, 0, 0, 2))
    assert dsconfig.zero_stage(replicated) == 0 and "auto" not in json.dumps(replicated)
    with pytest.raises(dsconfig.DeepSpeedConfigError, match="auto is decided on the workers"):
        dsconfig.build(job, 2, "float32")
    dsconfig.validate(job, 2)
    bad = _job(tmp_path, deepspeed={"config": "auto", "overrides": {"gradient_accumulation_steps": 2}})
    with pytest.raises(dsconfig.DeepSpeedConfigError, match="gradient_accumulation_steps is set from the job"):
        dsconfig.validate(bad, 2)


def test_auto_is_decided_at_the_jobs_first_start_and_kept_on_every_restart(tmp_path):
    """A restart (Ray's, after a lost worker) or a resume finds other free memory: it must keep
    the config the job started with, whose DeepSpeed checkpoint files it will look for."""
    job = _job(tmp_path).model_copy(update={"storage": str(tmp_path / "runs" / "job-1")})
    plenty, scarce = (64 * GIB, 64 * GIB), (2**20, 2**20)
    first = dsconfig.decide(job, "float32", plenty, 2, "cpu", rank=0)
    assert first.config == "replicated.json"
    assert json.loads((tmp_path / "runs" / "job-1" / dsconfig.CHOICE_FILE).read_text())["config"] == "replicated.json"
    again = dsconfig.decide(job, "float32", scarce, 2, "cpu", rank=1)  # a restart on a machine with less free
    assert again.config == "replicated.json" and again.zero3_settings is None
    assert again.reason.startswith("decided at the job's first start: ") and again.info()["auto_device_gib"] == 64
    other = job.model_copy(update={"storage": str(tmp_path / "runs" / "job-2")})
    assert dsconfig.decide(other, "float32", scarce, 2, "cpu", rank=0).config == "zero3.json"  # a new job decides anew


def test_ptv2_validate_accepts_auto(tmp_path):
    from launcher.spec import SpecError, load_spec

    spec = {
        "name": "j",
        "model": {"name_or_path": "m", "task": "causal-lm"},
        "data": {"train_file": "t.jsonl"},
        "deepspeed": {"config": "auto"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert load_spec(tmp_path / "job.yaml", check_files=False).deepspeed.config == "auto"
    spec["deepspeed"]["overrides"] = {"train_batch_size": 64}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="deepspeed.overrides.train_batch_size is set from the job"):
        load_spec(tmp_path / "job.yaml", check_files=False)


def test_auto_is_the_default_and_what_the_shipped_jobs_use():
    assert DeepSpeedSettings().config == "auto"
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert len(jobs) >= 4
    for path in jobs:
        assert yaml.safe_load(path.read_text())["deepspeed"]["config"] == "auto", path.name


def test_memory_per_rank_on_a_cpu_is_the_available_host_memory():
    import psutil

    device_bytes, host_bytes = dsconfig.memory_per_rank(torch.device("cpu"))
    assert device_bytes == host_bytes
    assert 0.5 < host_bytes / psutil.virtual_memory().available < 2  # a single process: all of it


def test_zero3_gathers_every_supported_architecture_layer_by_layer():
    """zero3.json names each supported architecture's repeated block as a ZeRO-3 leaf module: one
    fetch per layer instead of one per linear/norm (a new architecture must be added there)."""
    for name in ("zero3.json", "zero3_offload.json"):
        leaves = set(
            json.loads((ROOT / "deepspeed_configs" / name).read_text())["zero_optimization"]["leaf_module"]["classes"]
        )
        for arch in ARCHS:
            model = tiny_model(
                arch, "causal-lm" if arch in DECODERS else "seq-cls", None if arch in DECODERS else ["a", "b"]
            )
            blocks = {type(m).__name__ for m in model.modules() if isinstance(m, CheckpointedLayer)}
            assert blocks and blocks <= leaves, (name, arch, blocks)
            assert sum(type(m).__name__ in leaves for m in model.modules()) == model.config.num_hidden_layers
