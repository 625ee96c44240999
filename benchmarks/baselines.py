"""What the benchmarks compare ptv2 with, plugged into the service through its extension points
(no branch for them in ptv2/ or launcher/):

- training (`ptv2.trainee.Trainable`): full fine-tuning (every weight trains) and LoRA (PEFT's
  adapters injected into the frozen base), through the same loop, data, schedule, evaluation and
  MLflow logging as a prompt; a linear probe is a prompt of length 0 (the spec's own setting);
- serving (`ptv2.scheduler.Scheduler`): static batches (a generation batch runs until its last
  row ends before the next one starts) and per-prompt switching (a batch holds one prompt's rows
  only, what systems that split batches by adapter do).

Ray pickles these to the workers and replicas by reference: benchmarks/ must be importable there
(the benchmarks put the repository on PYTHONPATH before Ray starts).
"""

from __future__ import annotations

from collections import deque

from ptv2.scheduler import Generating, Scheduler
from ptv2.serving import groups, predict
from ptv2.trainee import Trainable


# ---- training ---------------------------------------------------------------------------------------------
class FullFineTuning(Trainable):
    """Every weight of the base trains (with the head); no prompt artifact (the base changed)."""

    name = "full-ft"
    writes_prompt = False

    def trains(self, parameter: str) -> bool:
        return True


class Lora(Trainable):
    """PEFT's LoRA on the attention projections (`r`, alpha 2r, no dropout), injected into the
    frozen base in place (its class and API stay as they are), trained with the head."""

    name = "lora"
    writes_prompt = False

    def __init__(self, r: int = 8, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
        self.r, self.targets = r, targets

    def adapt(self, base) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        targets = [t for t in self.targets if t in present] or _bert_targets(present)
        inject_adapter_in_model(
            LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=0.0, target_modules=targets), base
        )

    def trains(self, parameter: str) -> bool:
        return "lora_" in parameter

    def describe(self) -> dict[str, str]:
        return {"trainable": f"lora r={self.r}"}


def _bert_targets(present: set[str]) -> list[str]:
    """BERT-family names for the attention projections (query/key/value and the output dense)."""
    return [t for t in ("query", "key", "value") if t in present]


# ---- serving ----------------------------------------------------------------------------------------------
class StaticScheduler(Scheduler):
    """Static batching: requests join only an empty decoder, so a batch decodes until its longest
    row ends while newer requests wait."""

    def choose(self, waiting, running: int, extent: int) -> list[Generating]:
        return super().choose(waiting, running, extent) if running == 0 else []


class PerPromptScheduler(Scheduler):
    """Per-prompt switching: each batch (prediction or generation) holds one prompt's rows, the
    prompts taking turns; a generation batch runs until its last row ends."""

    def run_predictions(self, rows):
        out: list = [None] * len(rows)
        for idx in groups(rows).values():
            for i, result in zip(idx, predict(self.base, [rows[i] for i in idx]), strict=True):
                out[i] = result
        return out

    def choose(self, waiting, running: int, extent: int) -> list[Generating]:
        if running or not waiting:
            return []
        prompt = waiting[0].rows[0].prompt
        same = deque(r for r in waiting if all(row.prompt is prompt for row in r.rows))
        joining = super().choose(same, 0, 0)
        for request in joining:
            waiting.remove(request)
        return joining
