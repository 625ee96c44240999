"""Run under `torchrun --nproc_per_node 2`: train a job, then check what only the live engine
can tell (partitioning, optimizer contents, frozen weights) and write a JSON report on rank 0.

    torchrun --nproc_per_node 2 tests/dist_worker.py JOB.yaml REPORT.json [--checks]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ptv2.callbacks import Callback, ConsoleLogger
from ptv2.distributed import gathered
from ptv2.train import load_job, train
from tests.helpers import FailOnce


class Losses(Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_step(self, rank, step, metrics):
        if rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "loss": metrics["loss"]}) + "\n")


def optimizer_groups(optimizer) -> list[tuple[float, int]]:
    """(learning rate, values held) per optimizer group. ZeRO-3 swaps a group's params for its
    flat fp32 partition; `fp16_groups` keeps the model's parameters, in the same order."""
    members = getattr(optimizer, "fp16_groups", None) or [g["params"] for g in optimizer.param_groups]
    return sorted(
        (g["lr"], sum(getattr(p, "ds_numel", p.numel()) for p in ps))
        for g, ps in zip(optimizer.param_groups, members, strict=True)
    )


def checks(job, result) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ptv2.artifact import load_prompt
    from ptv2.data import collator, load_examples
    from ptv2.tasks import task_of

    engine, model = result.engine, result.model
    world = dist.get_world_size()
    base_params = [(n, p) for n, p in model.base.named_parameters() if n not in model.head_names]
    report = {
        "partitioned": all(p.ds_tensor.numel() <= -(-p.ds_numel // world) for _, p in base_params),
        "partition_fraction": sum(p.ds_tensor.numel() for _, p in base_params)
        / sum(p.ds_numel for _, p in base_params),
    }
    trainable = {id(p) for _, p in model.trainable_parameters()}
    in_optimizer = [p for group in engine.optimizer.fp16_groups for p in group]
    report["optimizer_holds_only_trainable"] = {id(p) for p in in_optimizer} == trainable
    report["optimizer_numel"] = sum(p.ds_numel for p in in_optimizer)
    report["trainable_numel"] = sum(p.ds_numel for _, p in model.trainable_parameters())
    state_numel = sum(
        t.numel()
        for s in engine.optimizer.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    report["optimizer_state_numel_this_rank"] = state_numel

    # frozen weights: gathered, compared with the checkpoint on disk
    original = load_file(str(Path(job.model.name_or_path) / "model.safetensors"))
    unchanged = True
    for name, p in base_params:
        with gathered([p]):
            key = name if name in original else name.split(".", 1)[1]
            if dist.get_rank() == 0 and key in original and not torch.equal(p.data.cpu(), original[key]):
                unchanged = False
    report["frozen_unchanged"] = unchanged
    report["frozen_compared"] = sum(1 for n, _ in base_params if n in original or n.split(".", 1)[1] in original)

    # logits of the trained engine vs the saved prompt in a plain model
    tok = AutoTokenizer.from_pretrained(job.model.name_or_path)
    ex = [load_examples(job.data.train_file, job.data, job.model.task, job.model.labels, tok)[i] for i in range(4)]
    batch = collator(tok, job.model.task)(ex)
    batch.pop("labels")
    engine.eval()
    with torch.no_grad():
        live = engine(**batch).logits.float()
    if dist.get_rank() == 0:
        task = task_of(job.model.task)
        cls = task.auto_class
        kw = task.label_kwargs(job.model.labels)
        plain = cls.from_pretrained(job.model.name_or_path, **kw)
        loaded = load_prompt(result.artifact, plain).eval()
        with torch.no_grad():
            reloaded = loaded(**batch).logits
        report["reload_max_abs_diff"] = float((reloaded - live).abs().max())
    return report


def main() -> None:
    job_path, report_path = sys.argv[1], Path(sys.argv[2])
    job = load_job(job_path)
    losses = report_path.with_suffix(".losses.jsonl")
    callbacks = [ConsoleLogger(), Losses(losses)]
    if os.environ.get("FAIL_AT_STEP"):  # this test's own fault injection: rank 1 dies once
        callbacks.append(FailOnce(int(os.environ["FAIL_AT_STEP"]), 1, report_path.parent / ".failed-once"))
    result = train(job, callbacks)
    report = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "stopped": result.stopped,
        "metrics": result.metrics,
        "artifact": str(result.artifact),
        "groups": optimizer_groups(result.engine.optimizer),
        "head_numel": sum(getattr(p, "ds_numel", p.numel()) for p in result.model.head_state().values()),
    }
    if "--checks" in sys.argv:
        report.update(checks(job, result))
    if dist.get_rank() == 0:
        report_path.write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
