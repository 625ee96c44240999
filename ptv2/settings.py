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

Task = Literal["causal-lm", "seq-cls", "token-cls"]
Method = Literal["ptv2", "prompt-tuning"]
Init = Literal["normal", "vocab", "text"]


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
        from ptv2.tasks import task_of  # torch and transformers: only once a spec is validated

        return task_of(task).check_labels(labels)


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
    packing: bool = Field(
        False,
        description="several training examples per row up to max_length, each attending to the prompt and "
        "itself only (causal-lm): far less padding on short, uneven examples",
    )

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


class PromptConfig(BaseModel):
    """What to train. `length` 0 means no prompt at all (head only: a linear probe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field("ptv2", description="ptv2: deep prefix at every layer; prompt-tuning: input embeddings only")
    length: int = Field(16, ge=0, le=4096, description="number of prompt positions (0: no prompt, head only)")
    projection: int | None = Field(
        None, gt=0, le=65536, description="hidden size of the reparameterization MLP; null for a plain table"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the prompt during training")
    init: Init | None = Field(
        None,
        description="how the prompt starts: normal = N(0,1) rows (THUDM, PEFT); vocab = what the frozen model "
        "makes of P random vocabulary tokens (their keys/values at every layer for ptv2, their embeddings for "
        "prompt-tuning: Lester et al.); text = the same for the first P tokens of the training data "
        "(Li & Liang's real-word activations). Default: vocab, except normal for ptv2 on encoders "
        "and with a projection",
    )

    @model_validator(mode="after")
    def _init_needs_plain_table(self) -> PromptConfig:
        if self.init in ("vocab", "text") and self.projection:
            raise ValueError(
                f"init {self.init!r} sets the prompt rows directly, which the MLP reparameterization "
                "(projection) has not got: use init normal or projection null"
            )
        return self

    def resolved_init(self, kind: str) -> str:
        """The init used on a base model of `kind` ("decoder"/"encoder") when none is set: vocab
        for prompt tuning (Lester) and for deep prefixes on decoders (N(0,1) keys/values perturb
        every layer of a pretrained decoder: benchmarks/QUALITY.md), normal for deep prefixes
        on encoders (THUDM's setting, where the paper's results come from)."""
        if self.init is not None:
            return self.init
        if self.projection:
            return "normal"
        return "vocab" if self.method == "prompt-tuning" or kind == "decoder" else "normal"

    def to_dict(self) -> dict:
        return self.model_dump()


class EarlyStopping(_Strict):
    """Stop when the metric has not improved for `patience` evaluations; the best prompt (the best
    evaluation's) is then the final one."""

    patience: int = Field(ge=1, le=100000, description="evaluations without an improvement before the run stops")
    min_delta: float = Field(0.0, ge=0, description="how much better than the best a value must be to count")
    metric: str | None = Field(None, description="an eval metric of the task (default: its primary metric)")


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
    gradient_checkpointing: bool = Field(
        False,
        description="activation checkpointing: keep only each layer's input and recompute the layer in the "
        "backward (long sequences in less memory, ~1/3 more compute); the prefix still trains",
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="stop when the validation metric stops improving (needs validation_file, eval_every)"
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

    @model_validator(mode="after")
    def _early_stopping_can_compare(self) -> TrainJob:
        es = self.train.early_stopping
        if es is None:
            return self
        if self.data.validation_file is None or not self.train.eval_every:
            raise ValueError("train.early_stopping compares evaluations: set data.validation_file and train.eval_every")
        from ptv2.tasks import task_of  # torch and transformers: only once a spec is validated

        known = task_of(self.model.task).metrics
        if es.metric is not None and es.metric not in known:
            raise ValueError(
                f"train.early_stopping.metric: {es.metric!r} is not an eval metric of {self.model.task} "
                f"({', '.join(known)})"
            )
        return self

    def objective(self) -> tuple[str, str]:
        """(metric, "max"|"min"): what picks the best prompt (and stops early): the early-stopping
        metric, else the task's primary metric."""
        from ptv2.tasks import task_of  # (as above)

        task = task_of(self.model.task)
        es = self.train.early_stopping
        metric = es.metric if es is not None and es.metric else task.primary[0]
        return metric, task.metrics[metric]

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
