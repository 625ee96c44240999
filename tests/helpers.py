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
