"""End-to-end check of the real training loop on one device (part of benchmarks/gpu_check.sh).

Saves a small random-init Llama (~25M parameters) with the tests' word-level tokenizer and
synthetic prompt -> response data into a work folder, writes a job YAML, runs
`torchrun --nproc_per_node 1 -m ptv2.train job.yaml` (ZeRO-3, bf16 on CUDA / fp32 on CPU; with
--gradient-checkpointing the layers are recomputed in the backward), and
checks the outcome: training and eval losses finite and going down, the prompt artifact written
and verified (checksums, step, metrics), a checkpoint written, and the artifact reloaded into a
plain model reproducing the final eval loss. Small result files go to --out.

    python3 benchmarks/gpu_e2e.py --out DIR                 # on a GPU machine
    DS_ACCELERATOR=cpu python benchmarks/gpu_e2e.py --out DIR --device cpu   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STEP_RE = re.compile(r"\[ptv2\] step (\d+)/(\d+) loss (\S+)")
EVAL_RE = re.compile(r"\[ptv2\] eval step (\d+): (.*)")
TEST_RE = re.compile(r"\[ptv2\] test \(final prompt\): (.*)")


def pairs(text: str) -> dict[str, float]:
    words = text.split()
    return {k: float(v) for k, v in zip(words[0::2], words[1::2], strict=False)}


def prepare(work: Path, args, dtype: str) -> tuple[Path, int]:
    """Model + tokenizer folder, data files and the job YAML in `work`: the YAML path and the
    model's parameter count."""
    import torch
    from transformers import LlamaConfig

    from ptv2.model import build_from_config
    from tests.tiny import VOCAB, tiny_tokenizer, write_task_data

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=256,
        initializer_range=args.init_range,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = build_from_config(cfg, "causal-lm")
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    write_task_data(work / "train.jsonl", "causal-lm", n=512, seed=0)
    write_task_data(work / "dev.jsonl", "causal-lm", n=64, seed=1)
    write_task_data(work / "test.jsonl", "causal-lm", n=32, seed=2)
    spec = {
        "model": {"name_or_path": "model", "task": "causal-lm", "dtype": dtype},
        "prompt": {"method": "ptv2", "length": args.prefix, "init": "text"},  # layer-wise gathered K/V init
        "data": {
            "train_file": "train.jsonl",
            "validation_file": "dev.jsonl",
            "test_file": "test.jsonl",
            "max_length": 32,
        },
        "train": {
            "max_steps": args.steps,
            "lr": args.lr,
            "micro_batch_size": args.batch,
            "warmup_steps": 0,
            "schedule": "linear",
            "log_every": 1,
            "eval_every": max(1, args.steps // 4),
            "checkpoint_every": max(1, args.steps // 2),
            "keep_checkpoints": 1,
            "seed": 0,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "deepspeed": {
            "config": "zero3.json",
            # every parameter partitioned (gathered by hooks), as on a real multi-GPU run
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
        "storage": "out",
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, n_params


def run_training(job: Path, log_path: Path, timeout: float) -> tuple[int | None, float]:
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        env["PYTHONPATH"] = os.pathsep.join([*parts, str(ROOT)])
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "ptv2.train", str(job)]
    print("[e2e] " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=job.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its worker
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    return rc, time.time() - t0


def reload_eval(job_path: Path, device: str, dtype: str, batch: int) -> float:
    """The final artifact loaded into a plain (no DeepSpeed) model: its validation loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptv2.artifact import load_prompt
    from ptv2.data import collator, load_examples
    from ptv2.evaluate import evaluate
    from ptv2.train import load_job

    job = load_job(job_path)
    tok = AutoTokenizer.from_pretrained(job.model.name_or_path)
    base = AutoModelForCausalLM.from_pretrained(job.model.name_or_path, dtype=getattr(torch, dtype))
    model = load_prompt(Path(job.storage) / "prompt", base).to(device).eval()
    examples = load_examples(job.data.validation_file, job.data, "causal-lm", None, tok)
    metrics = evaluate(
        model,
        examples,
        "causal-lm",
        None,
        batch,
        collator(tok, "causal-lm"),
        0,
        1,
        torch.device(device),
    )
    return metrics["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the small result files")
    ap.add_argument("--work", default="/tmp/ptv2_e2e", help="scratch folder (model, data, run); emptied first")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--prefix", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--init-range", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=150, help="seconds allowed for the torchrun training")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing: true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda":
        import torch

        assert torch.cuda.is_available(), "no CUDA device (use --device cpu with DS_ACCELERATOR=cpu)"
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"

    t0 = time.time()
    job, n_params = prepare(work, args, dtype)
    shutil.copy(job, out / "e2e_job.yaml")
    print(f"[e2e] model: {n_params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}", flush=True)
    log_path = out / "e2e_train.log"
    rc, train_s = run_training(job, log_path, args.timeout)
    log = log_path.read_text(errors="replace")

    steps = {int(m[1]): float(m[3]) for m in STEP_RE.finditer(log)}
    evals = {int(m[1]): pairs(m[2]) for m in EVAL_RE.finditer(log)}
    test = TEST_RE.search(log)
    info_line = next((ln for ln in log.splitlines() if "zero_stage=" in ln), "")
    info = dict(w.split("=", 1) for w in info_line.split() if "=" in w)
    res: dict = {
        "device": args.device,
        "dtype": dtype,
        "torchrun_rc": rc,
        "train_wall_s": round(train_s, 1),
        "info": info,
        "train_loss": steps,
        "eval": evals,
        "test": pairs(test[1]) if test else None,
    }
    problems = []
    if rc is None:
        problems.append(f"training timed out after {args.timeout:.0f}s")
    elif rc != 0:
        problems.append(f"torchrun exited with {rc}")
    if "[ptv2] prompt:" not in log:
        problems.append("the run did not reach its end ('[ptv2] prompt:' missing)")
    expected = {"zero_stage": "3", "dtype": dtype, "device": args.device}
    expected["gradient_checkpointing"] = str(args.gradient_checkpointing)
    if any(info.get(k) != v for k, v in expected.items()):
        problems.append(f"unexpected run setup: {info_line.strip()!r}")
    losses = [steps[s] for s in sorted(steps)]
    if len(losses) != args.steps:
        problems.append(f"{len(losses)} training steps logged, expected {args.steps}")
    elif not all(math.isfinite(v) for v in losses):
        problems.append("non-finite training loss")
    else:
        head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        res["train_loss_first5"], res["train_loss_last5"] = head, tail
        if not tail < 0.9 * head:
            problems.append(f"training loss did not go down: first 5 {head:.4f}, last 5 {tail:.4f}")
    eval_losses = [evals[s].get("loss", float("nan")) for s in sorted(evals)]
    if len(eval_losses) < 2 or not all(math.isfinite(v) for v in eval_losses):
        problems.append(f"eval losses missing or not finite: {eval_losses}")
    elif not eval_losses[-1] < eval_losses[0]:
        problems.append(f"eval loss did not go down: {eval_losses}")
    else:
        res["eval_loss_first"], res["eval_loss_last"] = eval_losses[0], eval_losses[-1]

    prompt_dir = work / "out" / "prompt"
    if (prompt_dir / "manifest.json").is_file():
        from ptv2.artifact import read_manifest

        try:
            manifest = read_manifest(prompt_dir)  # checks every file's checksum, shapes and dtypes
            shutil.copy(prompt_dir / "manifest.json", out / "e2e_prompt_manifest.json")
            extra = manifest.get("extra", {})
            res["artifact"] = {"step": extra.get("step"), "metrics": extra.get("metrics"), "head": manifest["head"]}
            if extra.get("step") != args.steps:
                problems.append(f"artifact step {extra.get('step')} != {args.steps}")
            final = (extra.get("metrics") or {}).get("loss")
            if final is None or not math.isfinite(final):
                problems.append(f"artifact has no finite final eval loss: {extra.get('metrics')}")
            elif eval_losses and abs(final - eval_losses[-1]) > 1e-3 * max(1.0, abs(final)):
                problems.append(f"artifact loss {final} != last logged eval loss {eval_losses[-1]}")
            if final is not None and math.isfinite(final) and "[ptv2] prompt:" in log:
                reloaded = reload_eval(job, args.device, dtype, args.batch)
                res["reload_eval_loss"] = reloaded
                # bf16 on GPU: the artifact holds the fp32 master prefix, training ran a bf16 copy
                tol = 0.02 * abs(final) + 0.02 if dtype == "bfloat16" else 1e-4 * abs(final) + 1e-5
                if not abs(reloaded - final) <= tol:
                    problems.append(f"reloaded prompt gives eval loss {reloaded:.5f}, training {final:.5f}")
        except Exception as e:  # report, don't hide the rest of the checks
            problems.append(f"artifact check failed: {type(e).__name__}: {e}")
    else:
        problems.append(f"no prompt artifact at {prompt_dir}")
    if not (work / "out" / "best" / "manifest.json").is_file():
        problems.append("no best-prompt artifact")
    ckpts = sorted(p.name for p in (work / "out" / "checkpoints").glob("step-*"))
    res["checkpoints"] = ckpts
    if not ckpts:
        problems.append("no checkpoint written")
    res["model_params"] = n_params
    res["wall_s"] = round(time.time() - t0, 1)
    res["ok"] = not problems
    res["problems"] = problems
    (out / "e2e.json").write_text(json.dumps(res, indent=2))

    keep = [ln for ln in log.splitlines() if ln.startswith("[ptv2]") and "] step " not in ln]
    print("\n".join(keep[-20:]))
    print(json.dumps({k: v for k, v in res.items() if k not in ("train_loss", "eval")}, indent=2))
    if problems:
        print("\n".join(log.splitlines()[-60:]))
        raise SystemExit("e2e FAILED: " + "; ".join(problems))
    print("e2e OK")


if __name__ == "__main__":
    main()
