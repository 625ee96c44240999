"""What a training job reads before any model weight is loaded: tokenizer, model geometry,
DeepSpeed config and data, checked on every rank.

Every rank agrees before any collective: a bad row or a bad setting stops the job at once with
one message (`JobError`), which no retry can fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptv2 import dsconfig
from ptv2.artifact import ArtifactError
from ptv2.data import DataError, collator, first_tokens, load_examples
from ptv2.distributed import Process, all_gather, barrier
from ptv2.errors import JobError, first_line
from ptv2.geometry import Geometry, UnsupportedModelError
from ptv2.infer import pad_id
from ptv2.packing import pack, packed_collator
from ptv2.settings import TrainJob
from ptv2.tasks import Task, task_of

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
class Inputs:
    """What the job reads before any model weight is loaded."""

    task: Task
    tokenizer: object
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]  # evaluation batches (and training, unpacked)
    dtype: str
    ds_config: dict
    train: object  # tokenized datasets
    validation: object | None
    test: object | None
    ds_info: dict = field(default_factory=dict)  # which DeepSpeed config, and why (deepspeed.config: auto)
    collate_train: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None  # packed rows (data.packing)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


@contextlib.contextmanager
def node_first(process: Process) -> Iterator[None]:
    """The first process of each node runs the block before the others (which then find its
    results in the node's cache); every rank passes one barrier, even when the block fails."""
    if process.local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if process.local_rank == 0:
            barrier()


def agree(error: BaseException | None) -> None:
    """Collective: if any rank met a problem with the job, every rank raises it (rank order)."""
    everyone = all_gather(None if error is None else first_line(error, 2000))
    first = next((m for m in everyone if m), None)
    if first is not None:
        raise JobError(first) from error


def read_inputs(job: TrainJob, process: Process) -> Inputs:
    """Tokenizer, model geometry, DeepSpeed config and data, checked on every rank. Collective."""
    from transformers import AutoConfig, AutoTokenizer

    m, data = job.model, job.data
    auto = job.deepspeed.config == dsconfig.AUTO
    memory = dsconfig.memory_per_rank(process.device) if auto else None  # collective: every rank sees the same numbers
    result, error = None, None
    with node_first(process):
        try:
            task = task_of(m.task)
            geometry = Geometry.of(AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code))
            need = job.prompt.length + data.max_length
            if geometry.max_positions is not None and need > geometry.max_positions:
                raise JobError(
                    f"prompt.length: {job.prompt.length} prompt positions + data.max_length {data.max_length} = "
                    f"{need} exceed the {geometry.max_positions} positions {geometry.model_type} allows"
                )
            dtype = resolve_dtype(m.dtype, process.device)
            choice = (
                dsconfig.decide(job, dtype, memory, process.world_size, process.device.type, process.rank)
                if auto
                else None
            )
            ds_config = dsconfig.build(job, process.world_size, dtype, choice, process.device.type)
            tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
            tokenizer.padding_side = "right"

            def read(path: str | None):
                return None if path is None else load_examples(path, data, task, m.labels, tokenizer, cache=True)

            result = Inputs(
                task,
                tokenizer,
                collator(tokenizer, task),
                dtype,
                ds_config,
                read(data.train_file),
                read(data.validation_file),
                read(data.test_file),
                choice.info() if choice else {"deepspeed_config": Path(job.deepspeed.config).name},
            )
            if job.prompt.length and job.prompt.init == "text":
                first_tokens(result.train, job.prompt.length)
            if data.packing:
                if not task.packs:
                    raise JobError(f"data.packing: {task} examples are not packed (only causal-lm)")
                examples = len(result.train)
                result.train = pack(result.train, data.max_length, job.train.seed)
                result.collate_train = packed_collator(pad_id(tokenizer))
                fill = sum(len(r["input_ids"]) for r in result.train) / (len(result.train) * data.max_length)
                result.ds_info["packed"] = f"{examples} examples in {len(result.train)} rows ({fill:.0%} full)"
        except DETERMINISTIC as e:
            error = e
        except OSError as e:  # a model folder without the files transformers needs
            error = JobError(f"model.name_or_path: {m.name_or_path}: {first_line(e)}")
    agree(error)
    return result
