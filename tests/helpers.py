"""Small helpers shared by the tests."""

from __future__ import annotations

import torch

from ptv2.model import PromptedModel


def set_prefix(model: PromptedModel, kv: torch.Tensor) -> None:
    """Load an explicit prefix [layers, 2, kv_heads, P, head_dim] into a plain PrefixEncoder."""
    rows = kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)
    with torch.no_grad():
        model.prompt.embedding.weight.copy_(rows)


def randomize_prompt(model: PromptedModel, seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def fit(model: PromptedModel, batch: dict, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


class FailOnce:
    """A training callback that kills rank `rank` once, at step `step` (a test's fault
    injection; the marker file makes the restarted run go on)."""

    def __init__(self, step: int, rank: int, marker) -> None:
        self.step, self.rank, self.marker = step, rank, str(marker)

    def __getattr__(self, hook):  # every other callback hook does nothing
        if hook.startswith("on_"):
            return lambda *args: None
        raise AttributeError(hook)

    def on_step(self, rank: int, step: int, metrics: dict) -> None:
        import os
        from pathlib import Path

        if rank == self.rank and step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text("1")
            print(f"[ptv2] test failure injected: rank {rank} exits at step {step}", flush=True)
            os._exit(1)
