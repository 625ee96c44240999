"""Activation checkpointing with a deep prompt: every layer is really recomputed in the backward,
and the loss and every trainable gradient (prefix keys/values included) equal the unchecked run,
in plain PyTorch and inside a 1-rank DeepSpeed ZeRO-3 engine (a subprocess: its process group
and ZeRO hooks stay out of this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ptv2.model import PromptedModel
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["neg", "pos"]


def _batch(task: str, batch: int = 4, length: int = 11) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding in one row
    if task == "causal-lm":
        labels = ids.clone()
        labels[:, : length // 2] = -100  # loss on the second half, as the service's templates do
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _run(arch: str, task: str, method: str, checkpointing: bool):
    """(loss, gradients of the trainable parameters, forward calls of the first layer's first part)."""
    model = PromptedModel(
        tiny_model(arch, task, None if task == "causal-lm" else LABELS),
        PromptConfig(method=method, length=4, dropout=0.1),
        task,
    )
    randomize_prompt(model, seed=1)
    if checkpointing:
        model.enable_gradient_checkpointing()
    first = next(m for m in model.base.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = []
    next(first.children()).register_forward_hook(lambda *_: calls.append(1))
    model.train()  # dropout on: the recompute must replay the same masks
    torch.manual_seed(7)
    loss = model(**_batch(task)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}, len(calls)


@pytest.mark.parametrize(
    "arch,task,method",
    [
        ("llama", "causal-lm", "ptv2"),  # grouped-query attention: 4 query heads over 2 kv heads
        ("bert", "seq-cls", "ptv2"),
        ("gpt2", "causal-lm", "ptv2"),  # its model drops the cache when its own flag is set
        ("llama", "causal-lm", "prompt-tuning"),
    ],
)
def test_checkpointed_gradients_equal_the_unchecked_run(arch, task, method):
    loss, grads, calls = _run(arch, task, method, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = _run(arch, task, method, checkpointing=True)
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed layer ran again in the backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and any(n.startswith("prompt.") for n in grads)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name  # the prefix (and head) really get a gradient
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-8, msg=name)


ZERO3_WORKER = r"""
import faulthandler, json, sys
faulthandler.dump_traceback_later(280, exit=True)  # a hang shows its stack before the test's timeout
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
from transformers.integrations import HfDeepSpeedConfig
from ptv2 import dsconfig
from ptv2.distributed import setup
from ptv2.model import PromptedModel
from ptv2.settings import PromptConfig
from ptv2.settings import TrainJob
from tests.helpers import randomize_prompt
from tests.test_checkpointing import LABELS, _batch
from tests.tiny import tiny_model

setup()
out = {}
for arch, task in (("llama", "causal-lm"), ("bert", "seq-cls")):
    for checkpointing in (False, True):
        job = TrainJob.model_validate({"model": {"name_or_path": "x", "task": "causal-lm"},
            "data": {"train_file": "x"}, "train": {"micro_batch_size": 4}, "deepspeed": {"config": "zero3.json"}})
        cfg = dsconfig.build(job, 1, "float32", device_type="cpu")
        keep = HfDeepSpeedConfig(cfg)
        base = tiny_model(arch, task, None if task == "causal-lm" else LABELS)
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = PromptedModel(base, PromptConfig(length=4), task)
        randomize_prompt(model, seed=1)  # plain copies into the 1-rank partitions
        if checkpointing:
            model.enable_gradient_checkpointing()
        params = [p for _, p in model.trainable_parameters()]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=cfg,
                                          dist_init_required=False)
        leaves = [m for m in model.modules() if getattr(m, "_z3_leaf", False)]
        calls = []
        next(leaves[0].children()).register_forward_hook(lambda *_: calls.append(1))
        engine.train()
        loss = engine(**_batch(task)).loss
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).flatten().tolist() for n, p in model.trainable_parameters()}
        out[f"{arch}/{checkpointing}"] = dict(loss=loss.item(), grads=grads, leaves=len(leaves), calls=len(calls))
        engine.destroy()
json.dump(out, open(sys.argv[1], "w"))
"""


def test_checkpointed_gradients_equal_the_unchecked_run_under_zero3(tmp_path):
    report = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", ZERO3_WORKER, str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(report.read_text())
    for arch in ("llama", "bert"):
        plain, ckpt = out[f"{arch}/False"], out[f"{arch}/True"]
        assert plain["leaves"] == ckpt["leaves"] == 2  # zero3.json gathers each layer as one unit
        assert (plain["calls"], ckpt["calls"]) == (1, 2)  # recomputed, its weights gathered again
        assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert ckpt["grads"].keys() == plain["grads"].keys()
        for name, g in plain["grads"].items():
            assert any(v != 0 for v in g), name
            torch.testing.assert_close(torch.tensor(ckpt["grads"][name]), torch.tensor(g), rtol=1e-5, atol=1e-7)
