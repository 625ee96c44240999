"""GPU check (one H100/H200, a few minutes): a ≥1B-parameter random-init Llama in bf16 training a
P-Tuning v2 prefix, the same model, batch and prefix under each setting side by side:

  plain           plain PyTorch, no DeepSpeed (the reference step)
  plain_ckpt      + activation checkpointing (ptv2's `train.gradient_checkpointing`)
  plain_compiled  + torch.compile of each decoder layer (regional compilation)
  replicated      DeepSpeed stage 0 (replicated.json)
  zero3_before    ZeRO-3 as shipped before: every module fetched by its own hooks, coalesced gathers
  zero3           ZeRO-3 as shipped (zero3.json): each decoder layer fetched as one unit (leaf module)
  zero3_ckpt      zero3 + activation checkpointing
  zero3_compiled  zero3 + torch.compile of each decoder layer (ZeRO's hooks stay at layer boundaries)
  zero3_deepcompile  zero3 + DeepSpeed's DeepCompile (compile.deepcompile, engine.compile())
  zero3_quantized    zero3 + zero_quantized_nontrainable_weights (int8 frozen weights: lossy)

For each: seconds per step, tokens/s, MFU against the bound of a frozen model (forward +
activation-gradient backward ≈ 2 × forward = 4·N FLOPs per token), peak GPU memory, the loss on
the fixed batch going down, the first loss against plain's (the same computation), the prefix
moving and gathered frozen weights staying bit-identical. Every variant loads the same saved
weights (from_pretrained, as the service does; under ZeRO-3 straight into partitions). Results are
written after each variant, so a time limit keeps what finished. Also prints what
`deepspeed.config: auto` would choose for this model on this device.

    torchrun --nproc_per_node 1 benchmarks/gpu_check.py --variants plain,replicated,zero3 --json out.json

A CPU smoke run of the same code (tiny geometry, `DS_ACCELERATOR=cpu`, compile backend eager):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 benchmarks/gpu_check.py --allow-cpu --layers 2 --hidden 256 \\
        --intermediate 512 --heads 4 --kv-heads 2 --seq 64 --batch 2 --steps 4 --compile-backend eager
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
WARMUP = 3
# ZeRO-3 as shipped before layer-sized fetches (see benchmarks/step_cost.py)
ZERO3_BEFORE = {"zero_optimization": {"leaf_module": {"classes": []}, "stage3_allgather_sequential": False}}
# name: (DeepSpeed config file or None for plain PyTorch, overrides, checkpointing, compile)
VARIANTS = {
    "plain": (None, {}, False, None),
    "plain_ckpt": (None, {}, True, None),
    "plain_compiled": (None, {}, False, "layers"),
    "replicated": ("replicated.json", {}, False, None),
    "zero3_before": ("zero3.json", ZERO3_BEFORE, False, None),
    "zero3": ("zero3.json", {}, False, None),
    "zero3_ckpt": ("zero3.json", {}, True, None),
    "zero3_compiled": ("zero3.json", {}, False, "layers"),
    "zero3_deepcompile": ("zero3.json", {"compile": {"deepcompile": True}}, False, "deepcompile"),
    "zero3_quantized": (
        "zero3.json",
        {"zero_optimization": {"zero_quantized_nontrainable_weights": True}},
        False,
        None,
    ),
}
LOSSY = {"zero3_quantized"}  # int8 frozen weights: not the same computation by design
FROZEN = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full copies of (possibly ZeRO-3 partitioned) parameters. Collective: every rank enters."""
    from ptv2.distributed import gathered

    with gathered(list(params.values())):
        return {name: p.data.detach().clone() for name, p in params.items()}


def numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter's full size


def ds_config(name: str, overrides: dict, batch: int, world: int, device_type: str) -> dict:
    from ptv2 import dsconfig
    from ptv2.settings import TrainJob

    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": "x", "task": "causal-lm", "dtype": "bfloat16"},
            "data": {"train_file": "x"},
            "train": {"micro_batch_size": batch},
            "deepspeed": {"config": name, "overrides": overrides},
        }
    )
    return dsconfig.build(job, world, "bfloat16", device_type=device_type)


def compile_layers(model, backend: str) -> None:
    """Regional compilation: each decoder layer compiled (one graph per layer: its index is a
    constant in it; the identical graphs hit inductor's cache after the first)."""
    import torch._dynamo
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.compile(backend=backend)


def run_variant(name: str, args, d, model_dir: str, batch: dict, n_params: int, plain_linear) -> dict:
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ptv2 import dsconfig
    from ptv2.model import PromptedModel
    from ptv2.settings import PromptConfig

    file, overrides, checkpointing, compiled = VARIANTS[name]
    on_gpu = d.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = ds_config(file, overrides, args.batch, d.world_size, d.device.type) if file else None
    zero3 = cfg is not None and dsconfig.zero_stage(cfg) == 3
    # zero.Init swaps F.linear for DeepSpeed's own autograd function for the rest of the process;
    # plain PyTorch and stage 0 never enter zero.Init in the service, so they run with torch's own
    if not zero3:
        torch.nn.functional.linear = plain_linear
    t_build = time.perf_counter()
    keep = HfDeepSpeedConfig(cfg) if zero3 else None  # from_pretrained loads straight into partitions
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if not zero3:
        base = base.to(d.device)
    torch.manual_seed(0)  # the same prompt (init vocab draws its tokens) in every variant
    with deepspeed.zero.Init(config_dict_or_path=cfg) if zero3 else d.device:
        model = PromptedModel(base, PromptConfig(length=args.prefix), "causal-lm")
    del keep
    if checkpointing:
        model.enable_gradient_checkpointing()
    named = dict(model.trainable_parameters())
    params = list(named.values())
    assert params and all(n.startswith("prompt.") for n in named), f"unexpected trainable parameters: {list(named)}"
    opt = torch.optim.AdamW(params, lr=args.lr)
    engine = model
    if cfg is not None:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    if compiled == "layers":
        compile_layers(model, args.compile_backend)
    elif compiled == "deepcompile":
        engine.compile()
    build_s = time.perf_counter() - t_build
    base_named = dict(base.named_parameters())
    frozen_names = [n for n in FROZEN if n in base_named]
    frozen_before = snapshot({n: base_named[n] for n in frozen_names})
    prefix_before = snapshot(named)

    def step():
        loss = engine(**batch).loss
        if cfg is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    engine.train()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses, t_warm = [], time.perf_counter()
    for i in range(args.steps + WARMUP):
        if i == WARMUP:
            sync()
            warmup_s = time.perf_counter() - t_warm
            t0 = time.perf_counter()
        losses.append(step())  # no host sync inside the timed loop
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    losses = [float(v) for v in losses]
    profile = None
    if args.profile and name in ("plain", "zero3") and d.is_main:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            step()
            sync()
        key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        profile = f"== {name} (sorted by {key})\n" + prof.key_averages().table(sort_by=key, row_limit=22)
        profile += f"\n== {name} (sorted by host time)\n"
        profile += prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    frozen_after = snapshot({n: base_named[n] for n in frozen_names})
    prefix_after = snapshot(named)
    tokens_s = args.batch * args.seq * d.world_size / dt
    name_gpu = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name_gpu), None)
    res = {
        "variant": name,
        "ds_config": file,
        "overrides": overrides,
        "checkpointing": checkpointing,
        "compiled": compiled,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "step_s": dt,
        "tokens_per_s": tokens_s,
        "mfu_vs_frozen_bound": 4 * n_params * tokens_s / 1e12 / peak if peak else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "prefix_max_abs_change": max(
            (prefix_after[n].float() - prefix_before[n].float()).abs().max().item() for n in named
        ),
        "frozen_checked": frozen_names,
        "frozen_changed": [n for n in frozen_names if not torch.equal(frozen_before[n], frozen_after[n])],
        "profile": profile,
    }
    if cfg is not None:
        engine.destroy()
    return res


def check(res: dict, plain: dict | None) -> list[str]:
    problems = []
    losses = res["losses"]
    if not all(math.isfinite(v) for v in losses):
        problems.append("non-finite loss")
    elif not losses[-1] < losses[0]:
        problems.append(f"loss on the fixed batch did not go down ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if res["frozen_changed"]:
        problems.append(f"frozen weights changed: {res['frozen_changed']}")
    if len(res["frozen_checked"]) < 4:
        problems.append(f"only {len(res['frozen_checked'])} frozen weights found to compare")
    if not res["prefix_max_abs_change"] > 0:
        problems.append("the prefix did not change")
    if plain is not None and res["variant"] not in LOSSY:
        rel = abs(res["loss_first"] - plain["loss_first"]) / abs(plain["loss_first"])
        res["loss_first_rel_diff_vs_plain"] = rel
        if rel > 2e-2:  # bf16 kernels may round differently; a different computation shows far more
            problems.append(f"first loss {res['loss_first']:.4f} differs from plain's {plain['loss_first']:.4f}")
    return problems


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptv2 import dsconfig
    from ptv2.distributed import setup
    from ptv2.settings import TrainJob

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="plain,replicated,zero3_before,zero3", help=", ".join(VARIANTS))
    ap.add_argument("--optional", default="", help="variants whose failure is reported, not fatal")
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
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--profile", help="write the top operators of one plain and one zero3 step to this file")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke-test the code on the CPU accelerator")
    ap.add_argument("--json")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    optional = {v for v in args.optional.split(",") if v}
    unknown = sorted(set(names) - set(VARIANTS))
    assert not unknown, f"unknown variants {unknown}: {', '.join(VARIANTS)}"
    d = setup()
    on_gpu = d.device.type == "cuda"
    assert on_gpu or args.allow_cpu, "gpu_check needs a CUDA device (--allow-cpu for a CPU smoke run)"
    plain_linear = torch.nn.functional.linear
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    out: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "batch": args.batch, "seq": args.seq}
    out.update(prefix=args.prefix, steps_timed=args.steps, variants={}, problems={}, errors={})
    model_dir = tempfile.mkdtemp(prefix="gpu_check_model_")
    if d.is_main:  # one random init, saved: every variant loads the same weights
        torch.manual_seed(0)
        with torch.device(d.device):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    torch.distributed.broadcast_object_list(obj := [model_dir])
    model_dir = obj[0]
    n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).to("meta").parameters())
    out["params"] = n_params
    # what `deepspeed.config: auto` would pick for this job here
    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": model_dir, "task": "causal-lm", "dtype": "bfloat16"},
            "prompt": {"length": args.prefix},
            "data": {"train_file": "x", "max_length": args.seq},
            "train": {"micro_batch_size": args.batch},
        }
    )
    choice = dsconfig.choose(
        dsconfig.estimate(job, "bfloat16"), *dsconfig.memory_per_rank(d.device), d.world_size, d.device.type
    )
    out["auto"] = choice.info()
    if d.is_main:
        print(f"deepspeed.config auto would pick {choice.config}: {choice.reason}", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(d.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    profiles = []

    def write() -> None:
        if d.is_main and args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        if d.is_main and args.profile and profiles:
            Path(args.profile).write_text("\n".join(profiles))

    for name in names:
        t0 = time.perf_counter()
        try:
            res = run_variant(name, args, d, model_dir, batch, n_params, plain_linear)
        except Exception as e:  # noqa: BLE001 - recorded; fatal unless optional
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            if d.is_main:
                traceback.print_exc()
            res = None
        gc.collect()  # the variant's model and engine are gone: free their memory for the next
        if on_gpu:
            torch.cuda.empty_cache()
        if res is None:
            write()
            continue
        profile = res.pop("profile")
        if profile:
            profiles.append(profile)
        problems = check(res, out["variants"].get("plain"))
        out["variants"][name] = res
        if problems:
            out["problems"][name] = problems
        if d.is_main:
            short = {k: res[k] for k in ("step_s", "tokens_per_s", "mfu_vs_frozen_bound", "peak_gpu_mem_gib")}
            print(f"{name} ({time.perf_counter() - t0:.0f}s): {json.dumps(short)} problems {problems}", flush=True)
        write()
    v = out["variants"]
    for name in v:  # the ratios the issue asks for
        if "plain" in v:
            v[name]["over_plain"] = v[name]["step_s"] / v["plain"]["step_s"]
        if "replicated" in v:
            v[name]["over_replicated"] = v[name]["step_s"] / v["replicated"]["step_s"]
    if "plain" in v and "zero3" in v:
        out["zero3_over_plain"] = v["zero3"]["step_s"] / v["plain"]["step_s"]
        out["plain_mfu_vs_frozen_bound"] = v["plain"]["mfu_vs_frozen_bound"]
    fatal = {n: p for n, p in out["problems"].items() if n not in optional}
    fatal.update({n: [e] for n, e in out["errors"].items() if n not in optional})
    out["ok"] = not fatal
    write()
    if d.is_main:
        print(json.dumps({k: out[k] for k in ("zero3_over_plain", "plain_mfu_vs_frozen_bound") if k in out}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if fatal:
        raise SystemExit(f"gpu_check FAILED: {fatal}")
    if d.is_main:
        print("gpu_check OK")


if __name__ == "__main__":
    main()
