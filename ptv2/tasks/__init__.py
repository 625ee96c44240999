"""The task as an object: one class per task, holding everything that differs between them.

    causal-lm   CausalLM                 prompt -> response; loss on the response tokens only
    seq-cls     SequenceClassification   a text (and an optional second) -> one label
    token-cls   TokenClassification      words -> one tag per word (entities, seqeval)

Each task knows its transformers auto class and label rules, how a data row becomes token ids
(in batches, each bad row named), how examples are padded into batches, which targets a loss
averages over, the forward paths (which use only the prompted model's public methods), how its
evaluation counts add up across ranks and which metric is primary, and what a served prompt's
head is and answers. Nothing outside this package compares task names: ask `task_of(name)`.
"""

from __future__ import annotations

from ptv2.tasks.base import IGNORE_INDEX, TOKEN_KEYS, Counter, Task, blank  # noqa: F401 (the package's API)
from ptv2.tasks.causal_lm import CausalLM
from ptv2.tasks.classification import SequenceClassification
from ptv2.tasks.tagging import TokenClassification

TASKS: dict[str, Task] = {t.name: t for t in (CausalLM(), SequenceClassification(), TokenClassification())}


def task_of(task: str | Task) -> Task:
    """The task object of a task name (or the object itself)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task]
