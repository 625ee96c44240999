"""A multi-billion-parameter frozen model through the service: per-rank memory under ZeRO-3.

Builds once a Llama-geometry model of Llama-3.2-3B's shape (3.2B parameters, random init, saved
as sharded bf16 safetensors so that loading takes the real `from_pretrained` + `zero.Init`
path), then trains a P-Tuning v2 prompt on it through the service's own path (`run_spec`, what
`ptv2 run` calls: an embedded Ray, 2 CPU workers, DeepSpeed ZeRO-3, bf16, prefix 16) for a few
steps of short sequences. Every number is read back from what the run recorded in MLflow
(each rank's RSS before the model was loaded and its peak, the frozen bytes each rank holds,
load and step time, the loss curve); the prompt is fetched from MLflow, verified and reloaded.

    python benchmarks/scale.py --json out.json        # ~15 min on 2 cores (the first run also builds the model)

Goals: per-rank peak RSS growth (peak minus RSS just before the model is loaded) <= 0.75x the
model's bf16 size (never whole on one rank); frozen bytes resident per rank <= 1.1x total/2;
the loss falls; the artifact verifies and reloads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GEOMETRIES = {
    # Llama 3.2 3B's published geometry (config.json of meta-llama/Llama-3.2-3B)
    "llama3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # a ~1B model of the same family, for a quicker look
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}
GIB = 1024**3


def build_model(folder: Path, geometry: str) -> tuple[Path, int]:
    """A random-init model of `geometry` saved as sharded bf16 safetensors (once), with
    SmolLM2's tokenizer (its ids all fall inside the model's vocabulary). Returns its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ptv2.assets import smollm2_path

    config = LlamaConfig(**GEOMETRIES[geometry], initializer_range=0.02, dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if (folder / "model.safetensors.index.json").is_file():
        params = json.loads((folder / "params.json").read_text())["params"]
        return folder, params
    print(f"building {geometry} (random init, bf16) in {folder} ...", flush=True)
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    model.save_pretrained(tmp, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    (tmp / "params.json").write_text(json.dumps({"params": params, "geometry": geometry}))
    del model
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    print(f"built {params / 1e9:.2f}B parameters in {time.time() - t0:.0f} s", flush=True)
    return folder, params


def write_spec(work: Path, model: Path, steps: int, prefix: int) -> Path:
    from ptv2.assets import prepare

    prepare(work / "data", only=("chat",))
    spec = {
        "name": "scale",
        "model": {"name_or_path": str(model), "task": "causal-lm", "dtype": "bfloat16"},
        "prompt": {"method": "ptv2", "length": prefix},
        "data": {
            "train_file": str(work / "data" / "chat" / "train.jsonl"),
            "prompt_template": "User: {prompt}\nAssistant:",
            "max_length": 32,
        },
        "train": {"max_steps": steps, "lr": 2e-2, "micro_batch_size": 2, "log_every": 1, "seed": 0},
        # ZeRO-3 for a model that is not to be whole on a rank: a gathered parameter is released as
        # soon as its module is done, and nothing is prefetched (the tied 394M-value embedding is
        # one parameter: it is gathered alone, at the embedding lookup and again for the logits)
        "deepspeed": {
            "config": "zero3.json",
            "overrides": {
                "zero_optimization": {
                    "stage3_max_live_parameters": 0,
                    "stage3_max_reuse_distance": 0,
                    "stage3_prefetch_bucket_size": 0,
                }
            },
        },
        "storage": str(work / "storage"),
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "tracking": {"experiment": "scale"},
    }
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def measure(args) -> dict:
    from launcher.prompts import fetch
    from launcher.runner import run_spec
    from launcher.spec import load_spec
    from ptv2.tracking import Tracker

    cache = Path(args.model_dir or Path.home() / ".cache" / "ptv2" / f"scale-{args.geometry}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    model_dir, params = build_model(cache, args.geometry)
    work = Path(tempfile.mkdtemp(prefix="ptv2-scale-"))
    os.environ["PTV2_HOME"] = str(work / "home")
    try:
        spec_path = write_spec(work, model_dir, args.steps, args.prefix)
        t0 = time.time()
        summary = run_spec(load_spec(spec_path), spec_path.read_text())
        wall = time.time() - t0
        tracker = Tracker(summary.tracking_uri)
        m = tracker.run(summary.run_id).metrics
        losses = [h.value for h in tracker.history(summary.run_id, "train/loss")]
        world = 2
        before = [m[f"memory/rank{r}/rss_before_load_gib"] for r in range(world)]
        peak = [m[f"memory/rank{r}/peak_rss_gib"] for r in range(world)]
        resident = [m[f"memory/rank{r}/frozen_resident_gib"] for r in range(world)]
        bf16_gib = params * 2 / GIB
        fetched = work / "fetched"
        manifest = fetch(summary.tracking_uri, summary.run_id, fetched)
        reload = reload_prompt(model_dir, fetched)
        size = sum(f.stat().st_size for f in fetched.iterdir())
        return {
            "geometry": args.geometry,
            "params": params,
            "model_bf16_gib": bf16_gib,
            "workers": world,
            "prefix": args.prefix,
            "steps": args.steps,
            "rss_before_load_gib_per_rank": before,
            "peak_rss_gib_per_rank": peak,
            "peak_rss_growth_gib_per_rank": [p - b for p, b in zip(peak, before, strict=True)],
            "peak_rss_over_model_bf16": max(p - b for p, b in zip(peak, before, strict=True)) / bf16_gib,
            "frozen_resident_gib_per_rank": resident,
            "frozen_total_gib": m["memory/frozen_total_gib"],
            "resident_frozen_over_ideal": max(resident) / (m["memory/frozen_total_gib"] / world),
            "load_s": m["time/load_s"],
            "step_s": m["train/step_s"],
            "wall_s": wall,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "losses": losses,
            "artifact_bytes": size,
            "artifact_verified": manifest["base_model"]["name_or_path"] == str(model_dir),
            "artifact_reloaded": reload,
            "run_id": summary.run_id,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reload_prompt(model_dir: Path, prompt: Path) -> bool:
    """Load the fetched prompt on the base model (checksums, shapes and the base model's
    fingerprint are verified) and run one forward with it."""
    import torch
    from transformers import AutoTokenizer

    from ptv2.artifact import load_prompt
    from ptv2.model import load_base_model

    base, _ = load_base_model(model_dir, "causal-lm", dtype=torch.bfloat16)
    model = load_prompt(prompt, base).eval()
    enc = AutoTokenizer.from_pretrained(model_dir)(["User: hello\nAssistant:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    return bool(torch.isfinite(logits).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama3.2-3b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--model-dir", help="where the built model is kept (default: ~/.cache/ptv2/scale-GEOMETRY)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    result = measure(args)
    goals = {
        "peak RSS growth <= 0.75x bf16 size": result["peak_rss_over_model_bf16"] <= 0.75,
        "resident frozen <= 1.1x ideal": result["resident_frozen_over_ideal"] <= 1.1,
        "loss falls": result["loss_last"] < result["loss_first"],
        "artifact verifies and reloads": result["artifact_verified"] and result["artifact_reloaded"],
    }
    result["goals"] = goals
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
