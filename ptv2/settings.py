"""Typed settings of a training job: what the YAML job spec's sections hold.

The launcher's job spec is built from these models (plus its own `resources` and `tracking`),
so one definition serves validation, the JSON schema and the training loop. Unknown keys are
errors everywhere: a typo must not pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ptv2 import storage
from ptv2.prefix import PromptConfig

Task = Literal["causal-lm", "seq-cls", "token-cls"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _checked_location(location: str) -> str:
    """A path or storage URI, refused (as a field error) when the URI carries credentials."""
    try:
        return storage.check_uri(location)
    except storage.StorageError as e:
        raise ValueError(str(e)) from e


class ModelSettings(_Strict):
    name_or_path: str = Field(min_length=1, description="a local HF model folder (or a hub id where one is reachable)")
    task: Task
    labels: list[str] | None = Field(
        None, validate_default=True, description="label names (seq-cls) or tags (token-cls), in id order"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and compute: auto = bfloat16 on GPU, float32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code (off unless set)")

    # A field validator (task is declared first, so it is in `info.data`), not a model validator:
    # the error is then reported at model.labels, the field to fix.
    @field_validator("labels")
    @classmethod
    def _labels_fit_task(cls, labels: list[str] | None, info: ValidationInfo) -> list[str] | None:
        task = info.data.get("task")
        if task is None:  # the task itself is invalid and reported
            return labels
        if task == "causal-lm" and labels:
            raise ValueError("labels are only for seq-cls and token-cls tasks, not causal-lm")
        if task != "causal-lm":
            if not labels or len(labels) < 2:
                raise ValueError(f"task {task} needs at least 2 labels")
            if len(set(labels)) != len(labels):
                raise ValueError(f"labels must be unique, got {labels}")
        return labels


class DataSettings(_Strict):
    train_file: str = Field(
        min_length=1, description="jsonl, csv or parquet file (a path or storage URI) of training examples"
    )
    validation_file: str | None = Field(None, description="held-out examples for evaluation (and best-prompt choice)")
    test_file: str | None = Field(None, description="examples evaluated once, with the final prompt")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field("auto", description="auto: from the file suffix")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    prompt_column: str = "prompt"
    response_column: str = "response"
    prompt_template: str = Field(
        "{prompt}\n", description="generation: how the prompt text is laid out; {prompt} is replaced (no code runs)"
    )
    max_length: int = Field(128, ge=8, le=131072, description="tokens per example, prompt excluded")

    @field_validator("train_file", "validation_file", "test_file")
    @classmethod
    def _no_credentials(cls, location: str | None) -> str | None:
        return None if location is None else _checked_location(location)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("prompt_template must contain {prompt}")
        return template


class TrainSettings(_Strict):
    epochs: float | None = Field(None, gt=0, le=1000, description="passes over the training data (or use max_steps)")
    max_steps: int | None = Field(None, gt=0, le=10_000_000, description="optimizer steps; overrides epochs")
    lr: float = Field(1e-2, gt=0, le=10, description="peak learning rate (prompts like 1e-3..3e-2)")
    head_lr: float | None = Field(
        None,
        gt=0,
        le=10,
        description="peak learning rate of the task head (null: lr); an MLP prompt needs a far "
        "lower lr than a fresh head",
    )
    weight_decay: float = Field(0.0, ge=0, le=1)
    micro_batch_size: int = Field(8, ge=1, le=65536, description="examples per worker per forward")
    gradient_accumulation: int = Field(1, ge=1, le=4096)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null for none")
    seed: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: at the end only)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: none)")
    keep_checkpoints: int = Field(2, ge=1, le=100)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=0, le=100, description="worker-group restarts allowed (resume from checkpoint)")
    train_base: bool = Field(False, description="full fine-tuning baseline: also train the base model")
    gradient_checkpointing: bool = Field(
        False,
        description="activation checkpointing: keep only each layer's input and recompute the layer in the "
        "backward (long sequences in less memory, ~1/3 more compute); the prefix still trains",
    )

    @model_validator(mode="after")
    def _length(self) -> TrainSettings:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class DeepSpeedSettings(_Strict):
    config: str = Field(
        "auto",
        description="auto: replicated.json when the frozen model and activations fit on each device, zero3.json "
        "when they do not, zero3_offload.json when even a partition does not (decided on the workers, printed and "
        "logged); or a file in deepspeed_configs/, or a path to a DeepSpeed JSON",
    )
    overrides: dict = Field(default_factory=dict, description="merged into the file's JSON (nested keys)")


class TrainJob(_Strict):
    """Everything the training loop needs; paths are absolute by the time it runs."""

    model: ModelSettings
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    data: DataSettings
    train: TrainSettings = Field(default_factory=TrainSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    storage: str = Field(
        "runs/job",
        description="where this job's checkpoints and prompt artifacts go: a path (local or a shared "
        "filesystem) or an object-store URI such as s3://bucket/prefix/job",
    )

    @field_validator("storage")
    @classmethod
    def _storage_without_credentials(cls, location: str | None) -> str | None:
        return None if location is None else _checked_location(location)

    def resolve_paths(self, base: Path) -> TrainJob:
        """A copy with relative file paths made absolute against `base` (the spec's folder)."""

        def fix(p: str | None) -> str | None:
            if p is None or storage.is_uri(p):  # object-store URIs are absolute already
                return p
            path = Path(p).expanduser()
            return os.path.abspath(path if path.is_absolute() else base / path)  # keep symlinks as named

        data = self.data.model_copy(
            update={
                "train_file": fix(self.data.train_file),
                "validation_file": fix(self.data.validation_file),
                "test_file": fix(self.data.test_file),
            }
        )
        model = self.model
        local = Path(self.model.name_or_path).expanduser()
        if self.model.name_or_path.startswith((".", "/", "~")) or (base / local).exists():
            model = model.model_copy(update={"name_or_path": fix(self.model.name_or_path)})
        ds = self.deepspeed
        if Path(ds.config).suffix == ".json" and ("/" in ds.config or (base / ds.config).exists()):
            ds = ds.model_copy(update={"config": fix(ds.config)})
        return self.model_copy(update={"data": data, "model": model, "deepspeed": ds, "storage": fix(self.storage)})
