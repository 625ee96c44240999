"""Run under `torchrun --nproc_per_node 2`: load checkpoints under ZeRO-3 (persistence threshold
0: every weight partitioned) through ptv2's loader, and report whether each rank read its
partitions itself and whether every gathered weight equals the checkpoint's.

    torchrun --nproc_per_node 2 tests/dist_loading.py FOLDER REPORT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers.integrations import HfDeepSpeedConfig

from ptv2 import loading
from ptv2.distributed import setup
from ptv2.model import load_base_model

CASES = {  # folder name -> (task, labels)
    "llama-sharded": ("causal-lm", None),
    "bert-base-model": ("seq-cls", ["a", "b"]),
    "llama-wrong-shape": ("causal-lm", None),  # a weight with the right number of values, not the right shape
}


def main() -> None:
    folder, report = Path(sys.argv[1]), Path(sys.argv[2])
    d = setup()
    keep = HfDeepSpeedConfig(  # noqa: F841 (alive while loading)
        {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
    )
    calls = []
    real = loading.load_zero3
    loading.load_zero3 = lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    out = {}
    for name, (task, labels) in CASES.items():
        calls.clear()
        try:
            model, missing = load_base_model(folder / name, task, labels)
        except ValueError as e:
            out[name] = {"error": str(e)}
            continue
        saved = {}
        for f in loading.safetensors_files(folder / name):
            saved.update(load_file(f))
        prefix = model.base_model_prefix
        equal, compared, partitioned = True, 0, True
        for n, p in model.named_parameters():
            partitioned &= p.ds_tensor.numel() < p.ds_numel  # each rank holds a part, not the whole
            key = n if n in saved else n.removeprefix(f"{prefix}.")
            with deepspeed.zero.GatheredParameters([p]):
                if key in saved:
                    compared += 1
                    equal &= torch.equal(p.data.cpu(), saved[key])
        out[name] = {
            "streamed": bool(calls),
            "missing": missing,
            "equal": equal,
            "compared": compared,
            "partitioned": partitioned,
        }
    if d.rank == 0:
        report.write_text(json.dumps(out, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
