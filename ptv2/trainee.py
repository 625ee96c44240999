"""What a training run trains, and the DeepSpeed engine around it.

`Trainable` is the extension point: what is trained on the frozen base besides the task head.
The service trains the prompt its spec describes (`Trainable` itself). Another kind of training
plugs in by subclassing it and passing an instance to `ptv2.train.train` (or
`launcher.runner.run_spec` / `launcher.sweep.run_sweep`): it may change the base before the
prompt is added (`adapt`: inject LoRA layers), make more of the base trainable (`trains`: every
weight, for full fine-tuning) and say whether its result is a prompt artifact (`writes_prompt`).
The same loop, data, schedule, evaluation and tracking then run it: benchmarks/baselines.py
compares P-Tuning v2 with full fine-tuning and LoRA that way, without any branch for them here.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ptv2 import dsconfig
from ptv2.data import first_tokens
from ptv2.distributed import Process, gathered
from ptv2.fingerprint import fingerprint
from ptv2.inputs import Inputs
from ptv2.model import PromptedModel, head_parameter_names, load_base_model, vocab_init_ids
from ptv2.settings import TrainJob

# the transformers schedule behind each `train.schedule` (warmup applies to all of them)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
GIB = 1024**3


class Trainable:
    """What a run trains on the frozen base besides the task head: the spec's prompt (see the
    module docstring for how other kinds plug in). Instances are pickled to every worker."""

    name = "prompt"
    writes_prompt = True  # the run's result is a prompt artifact (final and best)

    def adapt(self, base) -> None:
        """Change the frozen base before the prompt is added (nothing, for a prompt)."""

    def trains(self, parameter: str) -> bool:
        """Whether base parameter `parameter` trains too (the task head always does)."""
        return False

    def describe(self) -> dict[str, str]:
        """What to record of it on the run."""
        return {"trainable": self.name}


@dataclass
class Trainee:
    """The model being trained and the DeepSpeed engine around it."""

    model: PromptedModel
    engine: object
    scheduler: object
    base_fingerprint: dict | None
    total_steps: int
    info: dict
    memory: dict[str, float]  # this rank's: RSS before the model was loaded, frozen bytes held
    writes_prompt: bool = True


def rss_gib() -> float:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss / GIB


def peak_rss_gib() -> float:
    """This process's largest resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def frozen_bytes(model: PromptedModel) -> tuple[int, int]:
    """(bytes of frozen weights this rank holds, bytes of all frozen weights): under ZeRO-3 a
    rank holds its partition (`ds_tensor`) of each, otherwise the whole tensor."""
    held = total = 0
    for p in model.parameters():
        if not p.requires_grad:
            held += getattr(p, "ds_tensor", p).numel() * p.element_size()
            total += getattr(p, "ds_numel", p.numel()) * p.element_size()
    return held, total


def trainable_fp32(model: PromptedModel) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the trainable parameters (the optimizer's master weights where the
    engine keeps them). Collective under ZeRO: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.trainable_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            with gathered([p]):
                full = p.data.detach().clone()
        out[name] = full.detach().float().cpu().clone()
    return out


def steps_per_epoch(n_examples: int, job: TrainJob, world: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / world) / job.train.micro_batch_size))


def build_trainee(job: TrainJob, inputs: Inputs, process: Process, trainable: Trainable | None = None) -> Trainee:
    """The frozen base (partitioned at load under ZeRO-3) + prompt + head (+ what `trainable`
    adds), in a DeepSpeed engine whose optimizer holds only the trainable parameters (the head
    may take its own lr)."""
    import deepspeed
    from transformers import get_scheduler
    from transformers.integrations import HfDeepSpeedConfig

    trainable = trainable or Trainable()
    m, t = job.model, job.train
    rss_before, t0 = rss_gib(), time.time()
    stage = dsconfig.zero_stage(inputs.ds_config)
    hf_ds = HfDeepSpeedConfig(inputs.ds_config) if stage == 3 else None  # must stay alive while loading
    dtype = getattr(torch, inputs.dtype)
    base, missing = load_base_model(m.name_or_path, inputs.task, m.labels, dtype, m.trust_remote_code)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = inputs.tokenizer.pad_token_id
    trainable.adapt(base)
    init = deepspeed.zero.Init(config_dict_or_path=inputs.ds_config) if stage == 3 else contextlib.nullcontext()
    with init:
        model = PromptedModel(
            base,
            job.prompt,
            inputs.task,
            trainable_head=head_parameter_names(base, missing),
            init_vocab=vocab_init_ids(inputs.tokenizer),
        )
    for name, param in base.named_parameters():
        if trainable.trains(name):
            param.requires_grad_(True)
    if job.prompt.length and job.prompt.init == "text":
        model.init_prompt_from_tokens(first_tokens(inputs.train, job.prompt.length))
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    del hf_ds
    # collective under ZeRO-3; a run that trains the base itself has no frozen base to name
    base_fp = fingerprint(base, base.config, exclude=model.head_names) if trainable.writes_prompt else None

    total = t.max_steps or max(
        1, math.ceil(t.epochs * steps_per_epoch(len(inputs.train), job, process.world_size) / t.gradient_accumulation)
    )
    heads = set(model.head_names)
    groups: dict[bool, list] = {False: [], True: []}
    for name, p in model.trainable_parameters():
        groups[name.removeprefix("base.") in heads].append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": (t.head_lr or t.lr) if head else t.lr} for head, ps in groups.items() if ps],
        lr=t.lr,
        weight_decay=t.weight_decay,
    )
    scheduler = get_scheduler(
        SCHEDULES[t.schedule], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=inputs.ds_config, dist_init_required=False
    )
    load_s = time.time() - t0
    held, total_frozen = frozen_bytes(model)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for _, p in model.trainable_parameters())
    n_base = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
    info = {
        "model": Path(m.name_or_path).name,
        "task": m.task,
        "method": job.prompt.method,
        "prefix": job.prompt.length,
        "workers": process.world_size,
        "zero_stage": stage,
        "dtype": inputs.dtype,
        "device": process.device.type,
        "trainable_params": n_trainable,
        "trainable_share_pct": round(100 * n_trainable / max(n_base, 1), 4),
        "train_examples": len(inputs.train),
        "steps": total,
        "base_weights_sha256": (base_fp or {}).get("weights_sha256", "")[:16],
        "storage": job.storage,
        "load_s": round(load_s, 2),
        **trainable.describe(),
    }
    info.update(inputs.ds_info, gradient_checkpointing=t.gradient_checkpointing)
    memory = {
        "rss_before_load_gib": rss_before,
        "frozen_resident_gib": held / GIB,
        "frozen_total_gib": total_frozen / GIB,
    }
    return Trainee(model, engine, scheduler, base_fp, total, info, memory, trainable.writes_prompt)
