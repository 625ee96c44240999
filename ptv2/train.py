"""The training loop: a prompt (and head) trained on a frozen model with DeepSpeed.

`train()` reads as its recipe: join the process group; read and check the tokenizer, model
config and data (every rank agrees before any collective, so a bad row or a bad setting stops
the job at once with one message, `JobError`, which no retry can fix); load the frozen model
(under ZeRO-3 straight into partitions, never whole on one rank) with the prompt and head; hand
only the trainable parameters to the optimizer; resume from the newest complete checkpoint in
the job's storage; train (evaluating and checkpointing on the way); write the prompt artifacts
to storage. The same code runs in a single process, under torchrun or the deepspeed launcher,
and inside a Ray Train worker whose process group already exists.

    python -m ptv2.train JOB.yaml     # one process, or: torchrun --nproc_per_node 2 -m ptv2.train JOB.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ptv2 import dsconfig, storage
from ptv2.artifact import MANIFEST, ArtifactError, collect_tensors, save_prompt
from ptv2.callbacks import Callback, ConsoleLogger
from ptv2.checkpoint import CheckpointError, Checkpoints, RunState
from ptv2.data import IGNORE_INDEX, BatchStream, DataError, collator, first_tokens, load_examples
from ptv2.distributed import Dist, all_sum, barrier, gathered, setup
from ptv2.errors import first_line
from ptv2.evaluate import PRIMARY_METRIC, evaluate
from ptv2.fingerprint import fingerprint
from ptv2.model import PromptedModel, head_parameter_names, load_base_model, vocab_init_ids
from ptv2.prefix import Geometry, UnsupportedModelError
from ptv2.settings import TrainJob

# the transformers schedule behind each `train.schedule` (warmup applies to all of them)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class JobError(ValueError):
    """A problem with the job itself (its data, settings or model) that no retry can fix; the
    message is one line naming the file and row, the field or the model. Every rank raises it."""


# Raised while reading the job's inputs, these are the job's fault, not the machine's.
DETERMINISTIC = (
    JobError,
    DataError,
    dsconfig.DeepSpeedConfigError,
    UnsupportedModelError,
    ArtifactError,
    FileNotFoundError,
)


@dataclass
class TrainResult:
    steps: int
    artifact: str | None  # where the final prompt is in storage
    best_artifact: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)
    engine: object = field(default=None, repr=False)  # the DeepSpeed engine, for callers that inspect it
    model: PromptedModel | None = field(default=None, repr=False)


@dataclass
class Inputs:
    """What the job reads before any model weight is loaded."""

    tokenizer: object
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    dtype: str
    ds_config: dict
    train: object  # tokenized datasets
    validation: object | None
    test: object | None
    ds_info: dict = field(default_factory=dict)  # which DeepSpeed config, and why (deepspeed.config: auto)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


GIB = 1024**3


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


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


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


@contextlib.contextmanager
def node_first(d: Dist) -> Iterator[None]:
    """The first process of each node runs the block before the others (which then find its
    results in the node's cache); every rank passes one barrier, even when the block fails."""
    if d.local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if d.local_rank == 0:
            barrier()


def agree(error: BaseException | None) -> None:
    """Collective: if any rank met a problem with the job, every rank raises it (rank order)."""
    mine = None if error is None else first_line(error, 2000)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    first = next((m for m in everyone if m), None)
    if first is not None:
        raise JobError(first) from error


# ---- the recipe's steps --------------------------------------------------------------------
def read_inputs(job: TrainJob, d: Dist) -> Inputs:
    """Tokenizer, model geometry, DeepSpeed config and data, checked on every rank. Collective."""
    from transformers import AutoConfig, AutoTokenizer

    m, data = job.model, job.data
    auto = job.deepspeed.config == dsconfig.AUTO
    memory = dsconfig.memory_per_rank(d.device) if auto else None  # collective: every rank sees the same numbers
    result, error = None, None
    with node_first(d):
        try:
            geometry = Geometry.of(AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code))
            need = job.prompt.length + data.max_length
            if geometry.max_positions is not None and need > geometry.max_positions:
                raise JobError(
                    f"prompt.length: {job.prompt.length} prompt positions + data.max_length {data.max_length} = "
                    f"{need} exceed the {geometry.max_positions} positions {geometry.model_type} allows"
                )
            dtype = resolve_dtype(m.dtype, d.device)
            choice = dsconfig.decide(job, dtype, memory, d.world_size, d.device.type, d.rank) if auto else None
            ds_config = dsconfig.build(job, d.world_size, dtype, choice, d.device.type)
            tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
            tokenizer.padding_side = "right"

            def read(path: str | None):
                return None if path is None else load_examples(path, data, m.task, m.labels, tokenizer, cache=True)

            result = Inputs(
                tokenizer,
                collator(tokenizer, m.task),
                dtype,
                ds_config,
                read(data.train_file),
                read(data.validation_file),
                read(data.test_file),
                choice.info() if choice else {"deepspeed_config": Path(job.deepspeed.config).name},
            )
            if job.prompt.length and job.prompt.init == "text":
                first_tokens(result.train, job.prompt.length)
        except DETERMINISTIC as e:
            error = e
        except OSError as e:  # a model folder without the files transformers needs
            error = JobError(f"model.name_or_path: {m.name_or_path}: {first_line(e)}")
    agree(error)
    return result


def steps_per_epoch(n_examples: int, job: TrainJob, world: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / world) / job.train.micro_batch_size))


def build_trainee(job: TrainJob, inputs: Inputs, d: Dist) -> Trainee:
    """The frozen base (partitioned at load under ZeRO-3) + prompt + head, in a DeepSpeed engine
    whose optimizer holds only the trainable parameters (the head may take its own lr)."""
    import deepspeed
    from transformers import get_scheduler
    from transformers.integrations import HfDeepSpeedConfig

    m, t = job.model, job.train
    rss_before, t0 = rss_gib(), time.time()
    stage = dsconfig.zero_stage(inputs.ds_config)
    hf_ds = HfDeepSpeedConfig(inputs.ds_config) if stage == 3 else None  # must stay alive while loading
    base, missing = load_base_model(m.name_or_path, m.task, m.labels, getattr(torch, inputs.dtype), m.trust_remote_code)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = inputs.tokenizer.pad_token_id
    init = deepspeed.zero.Init(config_dict_or_path=inputs.ds_config) if stage == 3 else contextlib.nullcontext()
    with init:
        model = PromptedModel(
            base,
            job.prompt,
            m.task,
            trainable_head=head_parameter_names(base, missing),
            train_base=t.train_base,
            init_vocab=vocab_init_ids(inputs.tokenizer),
        )
    if model.prompt is not None and job.prompt.init == "text":
        model.init_prompt_from_tokens(first_tokens(inputs.train, job.prompt.length))
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    del hf_ds
    base_fp = None if t.train_base else fingerprint(base, base.config, exclude=model.head_names)  # collective

    total = t.max_steps or max(
        1, math.ceil(t.epochs * steps_per_epoch(len(inputs.train), job, d.world_size) / t.gradient_accumulation)
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
        "workers": d.world_size,
        "zero_stage": stage,
        "dtype": inputs.dtype,
        "device": d.device.type,
        "trainable_params": n_trainable,
        "trainable_share_pct": round(100 * n_trainable / max(n_base, 1), 4),
        "train_examples": len(inputs.train),
        "steps": total,
        "base_weights_sha256": (base_fp or {}).get("weights_sha256", "")[:16],
        "storage": job.storage,
        "load_s": round(load_s, 2),
    }
    info.update(inputs.ds_info, gradient_checkpointing=t.gradient_checkpointing)
    memory = {
        "rss_before_load_gib": rss_before,
        "frozen_resident_gib": held / GIB,
        "frozen_total_gib": total_frozen / GIB,
    }
    return Trainee(model, engine, scheduler, base_fp, total, info, memory)


def labelled(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many targets a micro-batch's loss averages over (what HF's losses divide by)."""
    labels = batch["labels"]
    if task == "seq-cls":
        return labels.shape[0]
    if task == "causal-lm":
        labels = labels[:, 1:]  # next-token targets
    return int((labels != IGNORE_INDEX).sum())


def train_step(trainee: Trainee, batches: Sequence[dict], task: str, d: Dist) -> tuple[float, float]:
    """One optimizer step over `batches` (its micro-batches): every labelled target of the step,
    on every rank, weighs the same, however the targets fall into micro-batches. Returns
    (mean loss over the step's targets on all ranks, tokens this rank saw)."""
    counts = [labelled(b, task) for b in batches]
    total = max(all_sum([float(sum(counts))], d.device)[0], 1.0)
    loss_sum, tokens = 0.0, 0.0
    for batch, n in zip(batches, counts, strict=True):
        batch = {k: v.to(d.device) for k, v in batch.items()}
        loss = trainee.engine(**batch).loss  # mean over this micro-batch's targets
        # DeepSpeed averages gradients over ranks: scale so the step's gradient is the mean over all targets
        trainee.engine.backward(loss * (n * d.world_size / total), scale_wrt_gas=False)
        trainee.engine.step()
        loss_sum += loss.item() * n
        tokens += float(batch["attention_mask"].sum())
    return all_sum([loss_sum], d.device)[0] / total, tokens


def publish(local: Path, location: str) -> None:
    """Replace the prompt folder at `location` with `local`, its manifest last: a reader never
    finds a manifest next to the previous files."""
    storage.delete(location)
    for path in sorted(local.iterdir()):
        if path.name != MANIFEST:
            storage.upload_file(path, storage.join(location, path.name))
    storage.upload_file(local / MANIFEST, storage.join(location, MANIFEST))


class Run:
    """One training run of a job on this rank: the recipe's state between its steps."""

    def __init__(self, job: TrainJob, callbacks: list[Callback], checkpoints: Checkpoints, d: Dist) -> None:
        self.job, self.callbacks, self.checkpoints, self.d = job, callbacks, checkpoints, d
        self.scratch = storage.scratch()
        self.state = RunState()
        self.metrics: dict[str, float] = {}
        self.losses: list[float] = []
        self.best: str | None = None
        self.resumed_from: int | None = None

    def emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self.d.rank, *args)

    def log(self, message: str) -> None:
        if self.d.is_main:
            print(f"[ptv2] {message}", flush=True)

    def resume(self, trainee: Trainee, required: bool) -> None:
        """Continue from the newest checkpoint there is (`required`: an explicit resume, which
        fails saying why when there is none to trust, rather than start again from step 0)."""
        try:
            state = self.checkpoints.restore(
                trainee.engine, self.scratch, self.d.rank, self.d.world_size, self.log, required
            )
        except CheckpointError as e:  # every rank raises it (the choice was broadcast)
            raise JobError(f"--resume: {e}") from e
        if state is not None:
            self.state, self.resumed_from = state, state.step
        best = storage.join(self.job.storage, "best")
        self.best = best if storage.is_file(storage.join(best, MANIFEST)) else None

    def evaluate(self, trainee: Trainee, examples, inputs: Inputs) -> dict[str, float]:
        engine, t = trainee.engine, self.job.train
        engine.eval()
        metrics = evaluate(
            lambda **b: engine(**b).logits,
            examples,
            self.job.model.task,
            self.job.model.labels,
            t.micro_batch_size,
            inputs.collate,
            self.d.rank,
            self.d.world_size,
            self.d.device,
            labelled=lambda **b: engine(**b, labelled_stats=True),
        )
        engine.train()
        return metrics

    def write_artifact(self, trainee: Trainee, inputs: Inputs, kind: str, step: int) -> str:
        """Collective: gather the trainable state, rank 0 writes the artifact and publishes it
        to the job's storage; callbacks (MLflow) get the local copy and where it went."""
        m = self.job.model
        tensors = collect_tensors(trainee.model, trainable_fp32(trainee.model))  # collective gather first
        name = "prompt" if kind == "final" else kind
        location = storage.join(self.job.storage, name)
        local = self.scratch / name
        if self.d.is_main:
            save_prompt(
                trainee.model,
                local,
                base_name_or_path=m.name_or_path,
                labels=m.labels,
                base_fingerprint=trainee.base_fingerprint,
                tensors=tensors,
                extra={"step": step, "metrics": self.metrics},
                template=self.job.data.prompt_template,
                max_length=self.job.data.max_length,
                overwrite=True,
            )
            publish(local, location)
        barrier()
        self.emit("on_artifact", step, local, kind, location)
        return location

    def after_step(self, trainee: Trainee, inputs: Inputs, step: int) -> None:
        t, task = self.job.train, self.job.model.task
        if inputs.validation is not None and (
            (t.eval_every and step % t.eval_every == 0) or step == trainee.total_steps
        ):
            self.metrics = self.evaluate(trainee, inputs.validation, inputs)
            self.emit("on_eval", step, self.metrics)
            primary, mode = PRIMARY_METRIC[task]
            value, best = self.metrics[primary], self.state.best
            if (best is None or (value > best if mode == "max" else value < best)) and not t.train_base:
                self.state.best, self.state.best_step = value, step
                self.best = self.write_artifact(trainee, inputs, "best", step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < trainee.total_steps:
            d = self.d
            saved = self.checkpoints.save(trainee.engine, self.scratch, step, self.state, d.rank, d.world_size)
            self.emit("on_checkpoint", step, saved.name, saved.location, saved.digest)

    def loop(self, trainee: Trainee, inputs: Inputs) -> None:
        t, d = self.job.train, self.d
        stream = BatchStream(inputs.train, t.micro_batch_size, d.rank, d.world_size, t.seed)
        batches = map(inputs.collate, stream.from_micro(self.state.step * t.gradient_accumulation))
        trainee.engine.train()
        t0, tokens_seen, start = time.time(), 0.0, self.state.step
        for step in range(start + 1, trainee.total_steps + 1):
            loss, tokens = train_step(
                trainee, [next(batches) for _ in range(t.gradient_accumulation)], self.job.model.task, d
            )
            tokens_seen += tokens
            self.state.step = step
            if step % t.log_every == 0 or step == trainee.total_steps:
                self.losses.append(loss)
                self.emit(
                    "on_step",
                    step,
                    self.step_metrics(trainee, loss, tokens_seen, time.time() - t0, step - start, stream),
                )
            self.after_step(trainee, inputs, step)

    def step_metrics(self, trainee: Trainee, loss: float, tokens: float, elapsed: float, done: int, stream) -> dict:
        step = self.state.step
        metrics = {
            "loss": loss,
            "lr": trainee.scheduler.get_last_lr()[0],
            "tokens_per_s": all_sum([tokens], self.d.device)[0] / max(elapsed, 1e-9),
            "eta_s": elapsed / done * (trainee.total_steps - step),
            "step_s": elapsed / done,
            "epoch": step * self.job.train.gradient_accumulation / stream.per_epoch,
            "total_steps": trainee.total_steps,
        }
        norm = trainee.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics

    def finish(self, trainee: Trainee, inputs: Inputs) -> str | None:
        total = trainee.total_steps
        if inputs.test is not None:
            self.emit("on_test", total, self.evaluate(trainee, inputs.test, inputs))
        artifact = None if self.job.train.train_base else self.write_artifact(trainee, inputs, "final", total)
        summary = {"steps": total, "artifact": artifact, **{f"final_{k}": v for k, v in self.metrics.items()}}
        self.emit("on_train_end", {**summary, "resources": self.resources(trainee)})
        return artifact

    def resources(self, trainee: Trainee) -> dict[str, float]:
        """Collective: every rank's memory (RSS before the model was loaded and its peak, frozen
        weights held) and the load time, as flat metric names."""
        mine = {**trainee.memory, "peak_rss_gib": peak_rss_gib()}
        everyone = [mine]
        if dist.is_initialized() and self.d.world_size > 1:
            everyone = [None] * self.d.world_size
            dist.all_gather_object(everyone, mine)
        out = {"time/load_s": trainee.info["load_s"], "memory/frozen_total_gib": mine["frozen_total_gib"]}
        for r, mem in enumerate(everyone):
            out.update({f"memory/rank{r}/{k}": v for k, v in mem.items() if k != "frozen_total_gib"})
        return out


def train(
    job: TrainJob,
    callbacks: Sequence[Callback] | None = None,
    checkpoints: Checkpoints | None = None,
    d: Dist | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `job` on this rank (every rank calls it). `checkpoints` decides how checkpoints
    reach storage (default: copied to `<job.storage>/checkpoints`; Ray Train passes its own).
    The newest usable checkpoint is always resumed from; `resume` (an explicit resume) fails,
    saying why, when there is none rather than start from step 0."""
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module="torch.distributed"
    )  # DeepSpeed 0.19 on torch 2.13
    d = d or setup()
    seed_everything(job.train.seed)
    run = Run(
        job,
        list(callbacks) if callbacks is not None else [ConsoleLogger()],
        checkpoints or Checkpoints(storage.join(job.storage, "checkpoints"), job.train.keep_checkpoints),
        d,
    )
    try:
        run.log(f"reading the tokenizer and data on {d.world_size} rank(s)")
        inputs = read_inputs(job, d)
        run.log(f"loading the frozen model {job.model.name_or_path} ({len(inputs.train):,} training examples)")
        trainee = build_trainee(job, inputs, d)
        run.resume(trainee, required=resume)
        run.emit("on_train_start", trainee.info)
        run.loop(trainee, inputs)
        artifact = run.finish(trainee, inputs)
    finally:
        storage.remove_scratch(run.scratch)
    return TrainResult(
        trainee.total_steps,
        artifact,
        run.best,
        run.metrics,
        run.resumed_from,
        run.losses,
        trainee.engine,
        trainee.model,
    )


def load_job(path: str | Path) -> TrainJob:
    """A TrainJob from a YAML file holding its sections (the launcher's job specs are richer)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    return TrainJob.model_validate(raw).resolve_paths(path.resolve().parent)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a prompt with DeepSpeed (single process, torchrun or deepspeed).")
    ap.add_argument("job", help="YAML with model/prompt/data/train/deepspeed/storage sections")
    args = ap.parse_args(argv)
    result = train(load_job(args.job))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if result.artifact:
        print(f"[ptv2] prompt: {result.artifact}")


if __name__ == "__main__":
    main()
