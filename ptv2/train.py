"""The training loop: a prompt (and head) trained on a frozen model with DeepSpeed.

`train()` reads as its recipe: join the process group; read and check the tokenizer, model
config and data (`ptv2.inputs`: every rank agrees before any collective, so a bad row or a bad
setting stops the job at once with one message, `JobError`, which no retry can fix); build the
trainee (`ptv2.trainee`: the frozen model, under ZeRO-3 straight into partitions, with the
prompt and head in an engine whose optimizer holds only what trains); resume from the newest
checkpoint in the job's storage that can be trusted; train, evaluating and checkpointing on
the way; write the prompt artifacts to storage. The same code runs in a single process, under
torchrun or the deepspeed launcher, and inside a Ray Train worker whose process group exists.

    python -m ptv2.train JOB.yaml     # one process, or: torchrun --nproc_per_node 2 -m ptv2.train JOB.yaml
"""

from __future__ import annotations

import argparse
import json
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
from safetensors.torch import load_file

from ptv2 import storage
from ptv2.artifact import MANIFEST, RAW, collect_tensors, save_prompt
from ptv2.callbacks import Callback, ConsoleLogger
from ptv2.checkpoint import CheckpointError, Checkpoints, RunState
from ptv2.data import BatchStream
from ptv2.distributed import Process, all_gather, all_sum, barrier, gathered, setup
from ptv2.errors import JobError
from ptv2.evaluate import evaluate
from ptv2.inputs import Inputs, read_inputs
from ptv2.model import PromptedModel
from ptv2.report import dataset_report
from ptv2.settings import TrainJob
from ptv2.tasks import Task
from ptv2.trainee import Trainable, Trainee, build_trainee, peak_rss_gib, trainable_fp32

REPORT_ROWS = 100_000  # of each data file, for the report a run logs at its start (seconds, not minutes)


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
    stopped: str | None = None  # why early stopping ended the run before its last step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(trainee: Trainee, batches: Sequence[dict], task: Task, process: Process) -> tuple[float, float]:
    """One optimizer step over `batches` (its micro-batches): every labelled target of the step,
    on every rank, weighs the same, however the targets fall into micro-batches. Returns
    (mean loss over the step's targets on all ranks, tokens this rank saw)."""
    counts = [task.targets(b) for b in batches]
    total = max(all_sum([float(sum(counts))], process.device)[0], 1.0)
    loss_sum, tokens = 0.0, 0.0
    for batch, n in zip(batches, counts, strict=True):
        batch = {k: v.to(process.device) for k, v in batch.items()}
        loss = trainee.engine(**batch).loss  # mean over this micro-batch's targets
        # DeepSpeed averages gradients over ranks: scale so the step's gradient is the mean over all targets
        trainee.engine.backward(loss * (n * process.world_size / total), scale_wrt_gas=False)
        trainee.engine.step()
        loss_sum += loss.item() * n
        tokens += float(batch["attention_mask"].sum())
    return all_sum([loss_sum], process.device)[0] / total, tokens


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

    def __init__(self, job: TrainJob, callbacks: list[Callback], checkpoints: Checkpoints, process: Process) -> None:
        self.job, self.callbacks, self.checkpoints, self.process = job, callbacks, checkpoints, process
        self.scratch = storage.scratch()
        self.state = RunState()
        self.metrics: dict[str, float] = {}
        self.losses: list[float] = []
        self.best: str | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # the best evaluation's trainable values
        self.best_metrics: dict[str, float] = {}
        self.resumed_from: int | None = None
        self.measures: dict[str, float] = {}

    def emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self.process.rank, *args)

    def log(self, message: str) -> None:
        if self.process.is_main:
            print(f"[ptv2] {message}", flush=True)

    def resume(self, trainee: Trainee, required: bool) -> None:
        """Continue from the newest checkpoint there is (`required`: an explicit resume, which
        fails saying why when there is none to trust, rather than start again from step 0)."""
        process = self.process
        try:
            state = self.checkpoints.restore(
                trainee.engine, self.scratch, process.rank, process.world_size, self.log, required
            )
        except CheckpointError as e:  # every rank raises it (the choice was broadcast)
            raise JobError(f"--resume: {e}") from e
        if state is not None:
            self.state, self.resumed_from = state, state.step
        best = storage.join(self.job.storage, "best")
        self.best = best if storage.is_file(storage.join(best, MANIFEST)) else None

    def evaluate(self, trainee: Trainee, examples, inputs: Inputs) -> dict[str, float]:
        engine, process = trainee.engine, self.process
        engine.eval()
        metrics = evaluate(
            engine,
            examples,
            inputs.task,
            self.job.model.labels,
            self.job.train.micro_batch_size,
            inputs.collate,
            process.rank,
            process.world_size,
            process.device,
        )
        engine.train()
        return metrics

    def write_artifact(self, trainee: Trainee, kind: str, step: int) -> str:
        """Collective: gather the trainable state, rank 0 writes the artifact and publishes it
        to the job's storage; callbacks (MLflow) get the local copy and where it went."""
        m = self.job.model
        tensors = collect_tensors(trainee.model, trainable_fp32(trainee.model))  # collective gather first
        name = "prompt" if kind == "final" else kind
        location = storage.join(self.job.storage, name)
        local = self.scratch / name
        if self.process.is_main:
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
        t, process = self.job.train, self.process
        due = (t.eval_every and step % t.eval_every == 0) or step == trainee.total_steps
        if inputs.validation is not None and due:
            self.metrics = self.evaluate(trainee, inputs.validation, inputs)
            self.emit("on_eval", step, self.metrics)
            self.judge(trainee, step)
        if self.state.stopped:
            return  # nothing more to resume: the run finishes now
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < trainee.total_steps:
            saved = self.checkpoints.save(
                trainee.engine, self.scratch, step, self.state, process.rank, process.world_size
            )
            self.emit("on_checkpoint", step, saved.name, saved.location, saved.digest)

    def judge(self, trainee: Trainee, step: int) -> None:
        """After an evaluation: a new best (by more than early stopping's min_delta) is kept, as the
        best prompt and in memory; early stopping's patience runs out after as many evaluations
        without one. The same on every rank (the metrics are)."""
        metric, mode = self.job.objective()
        es = self.job.train.early_stopping
        delta = es.min_delta if es is not None else 0.0
        value, best = self.metrics[metric], self.state.best
        if best is None or (value > best + delta if mode == "max" else value < best - delta):
            self.state.best, self.state.best_step, self.state.evals_since_best = value, step, 0
            self.best_metrics = dict(self.metrics)
            if es is not None:
                self.best_state = trainable_fp32(trainee.model)  # collective, like the artifact's gather
            if trainee.writes_prompt:
                self.best = self.write_artifact(trainee, "best", step)
            return
        self.state.evals_since_best += 1
        if es is not None and self.state.evals_since_best >= es.patience:
            self.state.stopped = (
                f"{metric} did not improve by more than {delta:g} in {es.patience} evaluations after its best, "
                f"{best:.4g} at step {self.state.best_step}"
            )
            self.emit("on_stop", step, self.state.stopped, self.state.best_step)

    def restore_best(self, trainee: Trainee) -> None:
        """Collective: put the best evaluation's trainable values back into the model (from memory,
        or from the best prompt in storage when the run resumed after it)."""
        state = self.best_state
        if state is None:
            local = storage.download(storage.join(self.job.storage, "best"), self.scratch / "best-in")
            raw = load_file(local / RAW)
            state = {(f"base.{k[5:]}" if k.startswith("head.") else k): v for k, v in raw.items()}
            self.best_metrics = json.loads((local / MANIFEST).read_text())["extra"]["metrics"]
        self.metrics = dict(self.best_metrics)  # the final prompt's evaluation, as its manifest says
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            for name, param in trainee.model.trainable_parameters():
                # the optimizer's fp32 master copy too: the artifact is written from it
                safe_set_full_fp32_param(param, state[name].to(param.device))
                with gathered([param], modifier_rank=0):
                    param.data.copy_(state[name].to(param.data))
        self.log(f"the best evaluation's prompt (step {self.state.best_step}) is the final one")

    def loop(self, trainee: Trainee, inputs: Inputs) -> None:
        t, process = self.job.train, self.process
        stream = BatchStream(inputs.train, t.micro_batch_size, process.rank, process.world_size, t.seed)
        batches = map(
            inputs.collate_train or inputs.collate, stream.from_micro(self.state.step * t.gradient_accumulation)
        )
        trainee.engine.train()
        t0, tokens_seen, start = time.time(), 0.0, self.state.step
        self.measures = {"tokens": 0.0}  # this process's steps: what time/train_s and train/tokens report
        for step in range(start + 1, trainee.total_steps + 1):
            loss, tokens = train_step(
                trainee, [next(batches) for _ in range(t.gradient_accumulation)], inputs.task, process
            )
            tokens_seen += tokens
            self.measures = {"time/train_s": time.time() - t0, "tokens": tokens_seen}
            self.state.step = step
            if step % t.log_every == 0 or step == trainee.total_steps:
                self.losses.append(loss)
                elapsed = time.time() - t0
                self.emit("on_step", step, self.step_metrics(trainee, loss, tokens_seen, elapsed, step - start, stream))
            self.after_step(trainee, inputs, step)
            if self.state.stopped:
                return

    def step_metrics(self, trainee: Trainee, loss: float, tokens: float, elapsed: float, done: int, stream) -> dict:
        step = self.state.step
        metrics = {
            "loss": loss,
            "lr": trainee.scheduler.get_last_lr()[0],
            "tokens_per_s": all_sum([tokens], self.process.device)[0] / max(elapsed, 1e-9),
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
        total = self.state.step
        step = total  # the final prompt's step
        if self.state.stopped:
            self.restore_best(trainee)
            step = self.state.best_step
        if inputs.test is not None:
            self.emit("on_test", total, self.evaluate(trainee, inputs.test, inputs))
        artifact = self.write_artifact(trainee, "final", step) if trainee.writes_prompt else None
        summary = {"steps": total, "artifact": artifact, **{f"final_{k}": v for k, v in self.metrics.items()}}
        if self.state.stopped:
            summary["stopped_early"] = self.state.stopped
        self.emit("on_train_end", {**summary, "resources": self.resources(trainee)})
        return artifact

    def resources(self, trainee: Trainee) -> dict[str, float]:
        """Collective: every rank's memory (RSS before the model was loaded and its peak, frozen
        weights held) and the load time, as flat metric names."""
        mine = {**trainee.memory, "peak_rss_gib": peak_rss_gib()}
        out = {"time/load_s": trainee.info["load_s"], "memory/frozen_total_gib": mine["frozen_total_gib"]}
        if "time/train_s" in self.measures:  # the steps this process ran (after a resume: since it)
            out["time/train_s"] = self.measures["time/train_s"]
            out["train/tokens"] = all_sum([self.measures["tokens"]], self.process.device)[0]  # every rank's
        for r, mem in enumerate(all_gather(mine)):
            out.update({f"memory/rank{r}/{k}": v for k, v in mem.items() if k != "frozen_total_gib"})
        return out


def train(
    job: TrainJob,
    callbacks: Sequence[Callback] | None = None,
    checkpoints: Checkpoints | None = None,
    process: Process | None = None,
    resume: bool = False,
    trainable: Trainable | None = None,
) -> TrainResult:
    """Train `job` on this rank (every rank calls it). `checkpoints` decides how checkpoints
    reach storage (default: copied to `<job.storage>/checkpoints`; Ray Train passes its own).
    The newest usable checkpoint is always resumed from; `resume` (an explicit resume) fails,
    saying why, when there is none rather than start from step 0. `trainable`: what trains
    besides the head (default: the spec's prompt; see `ptv2.trainee.Trainable`)."""
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module="torch.distributed"
    )  # DeepSpeed 0.19 on torch 2.13
    process = process or setup()
    seed_everything(job.train.seed)
    run = Run(
        job,
        list(callbacks) if callbacks is not None else [ConsoleLogger()],
        checkpoints or Checkpoints(storage.join(job.storage, "checkpoints"), job.train.keep_checkpoints),
        process,
    )
    try:
        run.log(f"reading the tokenizer and data on {process.world_size} rank(s)")
        inputs = read_inputs(job, process)
        if process.is_main:  # what the model sees, on the run before it trains (`ptv2 inspect` shows it all)
            reports = dataset_report(job.data, inputs.task, job.model.labels, inputs.tokenizer, REPORT_ROWS)
            run.emit("on_data", reports)
        run.log(f"loading the frozen model {job.model.name_or_path} ({len(inputs.train):,} training examples)")
        trainee = build_trainee(job, inputs, process, trainable)
        run.resume(trainee, required=resume)
        run.emit("on_train_start", trainee.info)
        run.loop(trainee, inputs)
        artifact = run.finish(trainee, inputs)
    finally:
        storage.remove_scratch(run.scratch)
    return TrainResult(
        run.state.step,
        artifact,
        run.best,
        run.metrics,
        run.resumed_from,
        run.losses,
        trainee.engine,
        trainee.model,
        run.state.stopped or None,
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
