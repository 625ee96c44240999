"""GPU check (≤5 minutes on one H100/H200): a ≥1B-parameter random-init Llama under DeepSpeed
ZeRO-3 in bf16, training a P-Tuning v2 prefix. Reports tokens/s, model FLOPs utilisation against
the bound of a frozen model (forward + activation-gradient backward ≈ 2 × forward = 4·N FLOPs per
token), and peak GPU memory. It also checks what training must and must not change: the loss on
the fixed batch goes down, the prefix moves, and gathered frozen base weights stay bit-identical.

    torchrun --nproc_per_node 1 benchmarks/gpu_check.py [--json gpu.json]

A CPU smoke run of the same code (tiny geometry, `DS_ACCELERATOR=cpu`):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 benchmarks/gpu_check.py --allow-cpu \\
        --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --seq 64 --batch 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
WARMUP = 3


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full copies of (possibly ZeRO-3 partitioned) parameters. Collective: every rank enters."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.data.detach().clone() for name, p in params.items()}


def numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter's full size


def time_plain(cfg, prefix: int, batch: dict, steps: int, lr: float, device: torch.device) -> float:
    """Seconds per step of the same prefix training in plain PyTorch (no DeepSpeed): the same
    bf16 model whole on the device, the fp32 prefix stepped by torch AdamW. The side-by-side
    baseline that says what ZeRO-3 costs on top."""
    from transformers import LlamaForCausalLM

    from ptv2.model import PromptedModel
    from ptv2.prefix import PromptConfig

    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    model = PromptedModel(base, PromptConfig(length=prefix), "causal-lm").to(device).train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(steps + WARMUP):
        if i == WARMUP:
            sync()
            t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ptv2 import dsconfig
    from ptv2.distributed import setup
    from ptv2.model import PromptedModel
    from ptv2.prefix import PromptConfig
    from ptv2.settings import TrainJob

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    # TinyLlama-1.1B geometry by default: 22 layers, hidden 2048, 32 heads, 4 KV heads (GQA)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ds-config", default="zero3.json", help="a file of deepspeed_configs/ (zero3, replicated, ...)")
    ap.add_argument("--profile", help="write the top operators of one profiled ZeRO-3 step to this file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-PyTorch step time beside it")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke-test the code on the CPU accelerator")
    ap.add_argument("--json")
    args = ap.parse_args()
    d = setup()
    on_gpu = d.device.type == "cuda"
    assert on_gpu or args.allow_cpu, "gpu_check needs a CUDA device (--allow-cpu for a CPU smoke run)"
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": "x", "task": "causal-lm", "dtype": "bfloat16"},
            "data": {"train_file": "x"},
            "train": {"micro_batch_size": args.batch},
            "deepspeed": {"config": args.ds_config},
        }
    )
    ds = dsconfig.build(job, d.world_size, "bfloat16")
    zero3 = dsconfig.zero_stage(ds) == 3
    keep = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841
    t_build = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds) if zero3 else d.device:
        base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(numel(p) for p in base.parameters())
    with deepspeed.zero.Init(config_dict_or_path=ds) if zero3 else d.device:
        model = PromptedModel(base, PromptConfig(length=args.prefix), "causal-lm")
    named = dict(model.trainable_parameters())
    params = list(named.values())
    assert params and all(n.startswith("prompt.") for n in named), f"unexpected trainable parameters: {list(named)}"
    assert not any(p.requires_grad for p in base.parameters()), "a base parameter is trainable"
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(params, lr=args.lr), config=ds, dist_init_required=False
    )
    build_s = time.perf_counter() - t_build

    # frozen weights to compare after training: embeddings, a first- and a last-layer matrix, the head
    base_named = dict(base.named_parameters())
    frozen_names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    frozen_names = [n for n in frozen_names if n in base_named]
    frozen_before = snapshot({n: base_named[n] for n in frozen_names})
    prefix_before = snapshot(named)

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(d.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(args.steps + WARMUP):
        if i == WARMUP:
            sync()
            t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())  # no host sync inside the timed loop
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    losses = [float(v) for v in losses]
    if args.profile and d.is_main:  # where one ZeRO-3 step's device time goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            engine.backward(engine(**batch).loss)
            engine.step()
            sync()
        key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=25))

    frozen_after = snapshot({n: base_named[n] for n in frozen_names})
    prefix_after = snapshot(named)
    frozen_changed = [n for n in frozen_names if not torch.equal(frozen_before[n], frozen_after[n])]
    prefix_delta = max((prefix_after[n].float() - prefix_before[n].float()).abs().max().item() for n in named)
    checksums = {n: float(frozen_after[n].double().sum()) for n in frozen_names}

    plain_dt = None
    if not args.no_baseline and d.world_size == 1:
        del keep  # construct the baseline model whole, not under ZeRO-3
        plain_dt = time_plain(cfg, args.prefix, batch, args.steps, args.lr, d.device)

    tokens_s = args.batch * args.seq * d.world_size / dt
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = 4 * n_params * tokens_s  # frozen model: forward 2N + activation backward ≈ 2N per token
    res = {
        "device": name,
        "params": n_params,
        "ds_config": args.ds_config,
        "trainable": sum(numel(p) for p in params),
        "batch": args.batch,
        "seq": args.seq,
        "steps_timed": args.steps,
        "build_s": build_s,
        "step_s": dt,
        "plain_pytorch_step_s": plain_dt,
        "zero3_over_plain": dt / plain_dt if plain_dt else None,
        "plain_mfu_vs_frozen_bound": (4 * n_params * args.batch * args.seq / plain_dt) / 1e12 / peak
        if plain_dt and peak
        else None,
        "tokens_per_s": tokens_s,
        "achieved_tflops": flops / 1e12,
        "mfu_vs_frozen_bound": flops / 1e12 / peak if peak else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "prefix_max_abs_change": prefix_delta,
        "frozen_checked": frozen_names,
        "frozen_changed": frozen_changed,
        "frozen_checksums": checksums,
    }
    problems = []
    if not all(math.isfinite(v) for v in losses):
        problems.append("non-finite loss")
    elif not losses[-1] < losses[0]:
        problems.append(f"loss on the fixed batch did not go down ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if frozen_changed:
        problems.append(f"frozen weights changed: {frozen_changed}")
    if not len(frozen_names) >= 4:
        problems.append(f"only {len(frozen_names)} frozen weights found to compare")
    if not prefix_delta > 0:
        problems.append("the prefix did not change")
    res["ok"] = not problems
    res["problems"] = problems
    if d.is_main:
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if problems:
        raise SystemExit("gpu_check FAILED: " + "; ".join(problems))
    if d.is_main:
        print("gpu_check OK")


if __name__ == "__main__":
    main()
