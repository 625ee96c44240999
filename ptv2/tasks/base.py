"""The task interface (`Task`, `Counter`) and what the tasks share; see `ptv2.tasks`."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ptv2.errors import ArtifactError

IGNORE_INDEX = -100  # a label position no loss or metric counts (transformers' convention)
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def blank(value) -> bool:
    return not isinstance(value, str) or not value.strip()


class Task:
    """What a task is; see the subclasses. Instances are stateless (one per task)."""

    name: str
    auto_class_name: str  # transformers' Auto class that builds a model for the task
    labelled = True  # needs label names (classes, tags)
    every_label_seen = False  # every label should occur in the training data (classes yes; BIO tags may not)
    generates = False  # continues text (generate, completions) with an LM head over the vocabulary
    peft_task_type: str | None = None  # PEFT's task type of an exported prefix (None: not exportable)
    packs = False  # training examples can be packed into rows (`ptv2.packing`)
    primary: tuple[str, str]  # the metric that picks the best prompt, and its direction
    metrics: dict[str, str]  # every metric evaluation gives -> "max" (higher is better) or "min"

    def __repr__(self) -> str:
        return self.name

    @property
    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    # ---- labels -----------------------------------------------------------------------------------
    def check_labels(self, labels: Sequence[str] | None) -> list[str] | None:
        """The label names, or ValueError saying what is wrong with them for this task."""
        if not self.labelled:
            if labels:
                raise ValueError(f"labels are only for seq-cls and token-cls tasks, not {self.name}")
            return None
        if not labels or len(labels) < 2:
            raise ValueError(f"task {self.name} needs at least 2 labels")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {list(labels)}")
        return list(labels)

    def label_kwargs(self, labels: Sequence[str] | None) -> dict:
        """What a transformers config needs to know of the labels."""
        labels = self.check_labels(labels)
        if labels is None:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    # ---- data -------------------------------------------------------------------------------------
    def columns(self, data) -> list[str]:
        """The columns of a data file this task reads (`data`: the spec's data settings)."""
        raise NotImplementedError

    def target_column(self, data) -> str:
        """The column the loss is on (response, label or tags); the others are the input."""
        raise NotImplementedError

    def label_names(self, values) -> set[str]:
        """The label names that a target column's values (one per row) use; none for a task
        without labels."""
        return set()

    def encode(self, batch: dict, data, labels: list[str], tokenizer) -> dict:
        """A batch of rows (column -> values) as token ids and labels, with "_error" (empty for
        a good row, else why it is bad)."""
        raise NotImplementedError

    def collator(self, tokenizer):
        """Pads examples into a batch (transformers' collators)."""
        raise NotImplementedError

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets a micro-batch's loss averages over (what transformers' losses divide by)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    # ---- the model -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor], **kwargs):
        """The task's output with the prompt in place (`model`: a PromptedModel; `batch`: its
        inputs, `labels` among them where given)."""
        raise NotImplementedError

    def counter(self, labels: Sequence[str] | None) -> Counter:
        """What evaluation counts for this task (see `Counter`)."""
        raise NotImplementedError

    # ---- serving ----------------------------------------------------------------------------------
    def head(self, base, tensors: dict[str, torch.Tensor], labels: list[str] | None):
        """The head a served prompt applies to the shared body's output (None: the base's LM head)."""
        raise NotImplementedError


class Counter:
    """Evaluation sums for one task: each batch adds its counts (`count`, float64 sums on this
    rank); one all-reduce adds every rank's; `metrics` turns the totals into the task's metrics."""

    size: int

    def count(self, forward, inputs: dict, gold: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`forward(**inputs, …)`: the model's output on a batch whose labels are `gold`; rows whose
        `valid` is False are padding repeats and count for nothing."""
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, float]:
        raise NotImplementedError


# ---- heads of served prompts ----------------------------------------------------------------------
def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def own_module(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A prompt's own copy of a head module holding `tensors` (all of them: strict). Never the
    shared module with weights swapped in for a call (`torch.func.functional_call` does that, in
    place): a batch runs heads outside the model's lock while another thread loads a prompt."""
    module = copy.deepcopy(template)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def refuse_other_tensors(tensors: dict, used: set[str], task: str) -> None:
    other = sorted(set(tensors) - used)
    if other:
        raise ArtifactError(
            f"this {task} prompt also trained {', '.join(other[:3])}: parts of the base model that every "
            "prompt of a served base shares (serve it with ptv2 predict instead)"
        )
