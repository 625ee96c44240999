"""The training loop: a prompt (and head) trained on a frozen model with DeepSpeed.

Reads top to bottom: join the process group, build the DeepSpeed config from the job, load the
frozen model (under ZeRO-3 straight into partitions, never whole on one rank), wrap it with the
prompt, hand only the trainable parameters to the optimizer, resume from the newest complete
checkpoint if there is one, train (evaluating and checkpointing on the way), and write the
prompt artifact collectively. The same code runs in a single process, under torchrun or the
deepspeed launcher, and inside a Ray Train worker whose process group already exists.

    python -m ptv2.train JOB.yaml     # one process, or: torchrun --nproc_per_node 2 -m ptv2.train JOB.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ptv2 import checkpoint, dsconfig
from ptv2.artifact import collect_tensors, save_prompt
from ptv2.callbacks import Callback, ConsoleLogger
from ptv2.data import collate, load_examples
from ptv2.distributed import Dist, all_sum, gathered, setup
from ptv2.evaluate import PRIMARY_METRIC, evaluate
from ptv2.fingerprint import fingerprint
from ptv2.model import PromptedModel, head_parameter_names, load_base_model
from ptv2.settings import TrainJob

FAIL_ENV = "PTV2_TEST_FAIL_AT_STEP"  # test-only: kill one worker once at this step


@dataclass
class TrainResult:
    steps: int
    artifact: Path | None
    best_artifact: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)
    engine: object = field(default=None, repr=False)  # the DeepSpeed engine, for callers that inspect it
    model: PromptedModel | None = field(default=None, repr=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return f


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


def text_init_ids(examples: Sequence[dict], length: int) -> torch.Tensor:
    """The first `length` tokens of the training data in file order (examples joined as
    tokenized, special tokens included): what prompt init "text" starts from."""
    ids: list[int] = []
    for ex in examples:
        ids += ex["input_ids"][: length - len(ids)]
        if len(ids) == length:
            return torch.tensor(ids)
    raise ValueError(f"prompt init 'text' needs {length} training tokens, the data has only {len(ids)}")


def _fail_once(step: int, out_dir: Path, rank: int) -> None:
    at = os.environ.get(FAIL_ENV)
    marker = out_dir / ".test-failure-done"
    if (
        at
        and int(at) == step
        and rank == int(os.environ.get("PTV2_TEST_FAIL_RANK", "1")) % max(1, dist.get_world_size())
    ) and not marker.exists():
        marker.write_text("1")
        print(f"[ptv2] test failure injected: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def train(job: TrainJob, callbacks: Sequence[Callback] | None = None, d: Dist | None = None) -> TrainResult:
    import deepspeed
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    callbacks = list(callbacks) if callbacks is not None else [ConsoleLogger()]
    # DeepSpeed 0.19 still calls torch.distributed APIs that torch 2.13 marks deprecated
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    d = d or setup()
    t, m = job.train, job.model
    out_dir = Path(job.output_dir)
    seed_everything(t.seed)
    dtype_name = resolve_dtype(m.dtype, d.device)
    ds_config = dsconfig.build(job, d.world_size, dtype_name)
    stage = dsconfig.zero_stage(ds_config)

    # ---- data -------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = load_examples(job.data.train_file, job.data, m.task, m.labels, tokenizer)
    test_ex = load_examples(job.data.test_file, job.data, m.task, m.labels, tokenizer) if job.data.test_file else []
    val_ex = (
        load_examples(job.data.validation_file, job.data, m.task, m.labels, tokenizer)
        if job.data.validation_file
        else []
    )

    # ---- model: frozen base (partitioned at load under ZeRO-3) + prompt + head --------------
    hf_ds = HfDeepSpeedConfig(ds_config) if stage == 3 else None  # must stay alive while loading
    base, missing = load_base_model(m.name_or_path, m.task, m.labels, getattr(torch, dtype_name), m.trust_remote_code)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = pad_id
    init = deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else contextlib.nullcontext()
    with init:
        model = PromptedModel(
            base, job.prompt, m.task, trainable_head=head_parameter_names(base, missing), train_base=t.train_base
        )
    if model.prompt is not None and job.prompt.init == "text":
        model.init_prompt_from_tokens(text_init_ids(train_ex, job.prompt.length))
    del hf_ds
    base_fp = None if t.train_base else fingerprint(base, base.config, exclude=model.head_names)  # collective
    params = [p for _, p in model.trainable_parameters()]
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    n_base = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())

    # ---- schedule ----------------------------------------------------------------------------
    per_epoch = max(1, math.ceil(math.ceil(len(train_ex) / d.world_size) / t.micro_batch_size))
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.gradient_accumulation))
    # one group per learning rate: the task head may take its own (the schedule scales both alike)
    heads = set(model.head_names)
    is_head = [n.removeprefix("base.") in heads for n, _ in model.trainable_parameters()]
    groups = [
        {"params": [p for p, h in zip(params, is_head, strict=True) if not h], "lr": t.lr},
        {"params": [p for p, h in zip(params, is_head, strict=True) if h], "lr": t.head_lr or t.lr},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, total))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )

    # ---- resume --------------------------------------------------------------------------------
    ckpt_root = out_dir / "checkpoints"
    state = {"step": 0, "best": None, "best_step": None}
    resumed_from = None
    log = (lambda msg: print(f"[ptv2] {msg}", flush=True)) if d.is_main else (lambda msg: None)
    found = checkpoint.choose_resume(ckpt_root, d.rank, log)
    if found is not None:
        state = checkpoint.load(engine, found, d.rank)
        resumed_from = state["step"]
        log(f"resumed from checkpoint {found.name} (step {resumed_from})")

    info = {
        "model": Path(m.name_or_path).name,
        "task": m.task,
        "method": job.prompt.method,
        "prefix": job.prompt.length,
        "workers": d.world_size,
        "zero_stage": stage,
        "dtype": dtype_name,
        "device": d.device.type,
        "trainable_params": n_trainable,
        "trainable_share_pct": round(100 * n_trainable / max(n_base, 1), 4),
        "train_examples": len(train_ex),
        "steps": total,
        "base_weights_sha256": (base_fp or {}).get("weights_sha256", "")[:16],
    }
    for cb in callbacks:
        cb.on_train_start(d.rank, info)

    # ---- the data stream: epoch-seeded shuffles, resumable at any micro-batch -----------------
    def stream(start_micro: int):
        micro = start_micro
        while True:
            epoch, offset = divmod(micro, per_epoch)
            g = torch.Generator().manual_seed(t.seed + epoch)
            order = torch.randperm(len(train_ex), generator=g).tolist()
            need = per_epoch * t.micro_batch_size * d.world_size  # every rank gets full, equal batches
            padded = (order * math.ceil(need / len(order)))[:need]
            mine = padded[d.rank :: d.world_size]
            for b in range(offset, per_epoch):
                yield [train_ex[i] for i in mine[b * t.micro_batch_size : (b + 1) * t.micro_batch_size]]
            micro = (epoch + 1) * per_epoch

    primary, mode = PRIMARY_METRIC[m.task]

    def run_eval(examples: list[dict]) -> dict[str, float]:
        engine.eval()
        metrics = evaluate(
            lambda **b: engine(**b).logits,
            examples,
            m.task,
            m.labels,
            t.micro_batch_size,
            pad_id,
            d.rank,
            d.world_size,
            d.device,
        )
        engine.train()
        return metrics

    def write_artifact(path: Path, kind: str, step: int, metrics: dict | None) -> Path | None:
        tensors = collect_tensors(model, trainable_fp32(model))  # collective gather first
        written = None
        if d.is_main:
            written = save_prompt(
                model,
                path,
                base_name_or_path=m.name_or_path,
                labels=m.labels,
                base_fingerprint=base_fp,
                tensors=tensors,
                extra={"step": step, "metrics": metrics or {}},
                overwrite=True,
            )
        dist.barrier()
        for cb in callbacks:
            cb.on_artifact(d.rank, step, path, kind)
        return written or path

    engine.train()
    data = stream(state["step"] * t.gradient_accumulation)
    losses: list[float] = []
    best_path = out_dir / "best" if (out_dir / "best").exists() else None
    metrics: dict[str, float] = {}
    t0, tokens_seen, start_step = time.time(), 0.0, state["step"]
    for step in range(state["step"] + 1, total + 1):
        loss_sum = 0.0
        for _ in range(t.gradient_accumulation):
            batch = {k: v.to(d.device) for k, v in collate(next(data), pad_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            tokens_seen += float(batch["attention_mask"].sum())
        state["step"] = step
        _fail_once(step, out_dir, d.rank)
        if step % t.log_every == 0 or step == total:
            mean_loss, tokens = all_sum([loss_sum / t.gradient_accumulation, tokens_seen], d.device)
            mean_loss /= d.world_size
            elapsed = time.time() - t0
            step_metrics = {
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "eta_s": elapsed / (step - start_step) * (total - step),
                "epoch": step * t.gradient_accumulation / per_epoch,
                "total_steps": total,
            }
            norm = engine.get_global_grad_norm()
            if norm is not None:
                step_metrics["grad_norm"] = float(norm)
            losses.append(mean_loss)
            for cb in callbacks:
                cb.on_step(d.rank, step, step_metrics)
        if val_ex and ((t.eval_every and step % t.eval_every == 0) or step == total):
            metrics = run_eval(val_ex)
            for cb in callbacks:
                cb.on_eval(d.rank, step, metrics)
            value = metrics[primary]
            better = state["best"] is None or (value > state["best"] if mode == "max" else value < state["best"])
            if better and not t.train_base:
                state["best"], state["best_step"] = value, step
                best_path = write_artifact(out_dir / "best", "best", step, metrics)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
            path = checkpoint.save(engine, ckpt_root, step, state, d.rank, t.keep_checkpoints)
            for cb in callbacks:
                cb.on_checkpoint(d.rank, step, path)

    if test_ex:
        test_metrics = run_eval(test_ex)
        for cb in callbacks:
            cb.on_test(d.rank, total, test_metrics)
    artifact = None if t.train_base else write_artifact(out_dir / "prompt", "final", total, metrics)
    summary = {
        "steps": total,
        "artifact": str(artifact) if artifact else None,
        **{f"final_{k}": v for k, v in metrics.items()},
    }
    for cb in callbacks:
        cb.on_train_end(d.rank, summary)
    return TrainResult(total, artifact, best_path, metrics, resumed_from, losses, engine, model)


def load_job(path: str | Path) -> TrainJob:
    """A TrainJob from a YAML file holding its sections (the launcher's job specs are richer)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    return TrainJob.model_validate(raw).resolve_paths(path.resolve().parent)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a prompt with DeepSpeed (single process, torchrun or deepspeed).")
    ap.add_argument("job", help="YAML with model/prompt/data/train/deepspeed/output_dir sections")
    args = ap.parse_args(argv)
    result = train(load_job(args.job))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if result.artifact:
        print(f"[ptv2] prompt: {result.artifact}")


if __name__ == "__main__":
    main()
