"""GPU check (≤5 minutes on one H100/H200): a ≥1B-parameter random-init Llama under DeepSpeed
ZeRO-3 in bf16, training a P-Tuning v2 prefix. Reports tokens/s, model FLOPs utilisation against
the bound of a frozen model (forward + activation-gradient backward ≈ 2 × forward = 4·N FLOPs per
token), and peak GPU memory.

    torchrun --nproc_per_node 1 benchmarks/gpu_check.py [--json gpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ptv2 import dsconfig
    from ptv2.distributed import setup
    from ptv2.model import PromptedModel
    from ptv2.prefix import PromptConfig
    from ptv2.settings import TrainJob

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    d = setup()
    assert d.device.type == "cuda", "gpu_check needs a CUDA device"
    # TinyLlama-1.1B geometry: 22 layers, hidden 2048, 32 heads, 4 KV heads (GQA)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": "x", "task": "causal-lm", "dtype": "bfloat16"},
            "data": {"train_file": "x"},
            "train": {"micro_batch_size": args.batch},
        }
    )
    ds = dsconfig.build(job, d.world_size, "bfloat16")
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    with deepspeed.zero.Init(config_dict_or_path=ds):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.ds_numel for p in base.parameters())
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = PromptedModel(base, PromptConfig(length=args.prefix), "causal-lm")
    params = [p for _, p in model.trainable_parameters()]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=ds, dist_init_required=False
    )
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=d.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens_s = args.batch * args.seq * d.world_size / dt
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = 4 * n_params * tokens_s  # frozen model: forward 2N + activation backward ≈ 2N per token
    res = {
        "device": name,
        "params": n_params,
        "trainable": sum(p.ds_numel for p in params),
        "step_s": dt,
        "tokens_per_s": tokens_s,
        "achieved_tflops": flops / 1e12,
        "mfu_vs_frozen_bound": flops / 1e12 / peak if peak else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }
    if d.is_main:
        print(json.dumps(res, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
