"""Sequence packing on short, uneven generation data: one epoch of SmolLM2-135M on the chatterbot
training split, on 2 CPU workers, three ways side by side in one run:

- ptv2 packed (`data.packing: true`): examples packed into rows of up to max_length tokens;
- ptv2 padded: every micro-batch padded to its longest example;
- PEFT prefix tuning padded, its normal way: `get_peft_model(PrefixTuningConfig)` under plain
  torch DDP (2 processes, gloo), a padding collator, the same examples, optimizer and schedule.

The ptv2 runs go through the service (`ptv2 run`, embedded Ray, replicated DeepSpeed, MLflow);
their numbers are read back from the MLflow runs (`time/train_s`: the training loop's wall time
on rank 0, evaluation excluded; `train/tokens`: real tokens of every rank; `eval/loss` on the
dev split). The PEFT run writes its own JSON. Modes rotate round by round so machine noise hits
them alike; medians over rounds.

Examples per optimizer step are matched: padded runs take 8 examples per micro-batch per worker,
the packed run as many rows as hold about as many examples (`--packed-micro`), so all three
take about as many steps of about as many examples; the ratio is the epoch's wall time.

    python benchmarks/packing.py --json benchmarks/packing_results.json   # ~25 minutes on 2 cores
    python benchmarks/packing.py --quick                                  # a few steps each: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODES = ("packed", "padded", "peft")


def check_splits(train: Path, dev: Path) -> int:
    """Refuse splits that share an example (inputs or whole rows); returns the dev size."""
    rows = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]  # noqa: E731
    seen = {r["prompt"] for r in rows(train)}
    shared = [r for r in rows(dev) if r["prompt"] in seen]
    if shared:
        raise SystemExit(f"{dev} shares {len(shared)} prompt(s) with {train}: de-duplicate first")
    return len(rows(dev))


def job_spec(args, tmp: Path, packed: bool) -> Path:
    spec = {
        "name": "packed" if packed else "padded",
        "model": {"name_or_path": str(args.model), "task": "causal-lm"},
        "prompt": {"method": "ptv2", "length": 16},
        "data": {
            "train_file": str(args.data / "train.jsonl"),
            "validation_file": str(args.data / "dev.jsonl"),
            "prompt_template": "User: {prompt}\nAssistant:",
            "max_length": args.max_length,
            "packing": packed,
        },
        "train": {
            "epochs": 1,
            "lr": args.lr,
            "micro_batch_size": args.packed_micro if packed else args.micro,
            "log_every": 5,
            "schedule": "linear",
            **({"max_steps": args.max_steps} if args.max_steps else {}),
        },
        "deepspeed": {"config": "replicated.json"},  # what DDP is: the same engine kind as PEFT's
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "tracking": {"experiment": "packing-bench", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
        "storage": str(tmp / "runs"),
    }
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_ptv2(args, tmp: Path, packed: bool) -> dict:
    """`ptv2 run` of the spec; the numbers as the service recorded them in MLflow."""
    import mlflow

    spec = job_spec(args, tmp, packed)
    env = {**os.environ, "PTV2_HOME": str(tmp / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(BIN / "ptv2"), "run", str(spec)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ptv2 run {spec.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run id:"))
    m = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(run_id).data.metrics
    steps = int(mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(run_id).data.tags["ptv2.steps"])
    packed_line = next((x for x in proc.stdout.splitlines() if "packed=" in x), "")
    return {
        "run_id": run_id,
        "train_s": m["time/train_s"],
        "tokens": m["train/tokens"],
        "tokens_per_s": m["train/tokens"] / m["time/train_s"],
        "steps": steps,
        "eval_loss": m["eval/loss"],
        "packed": packed_line.split("packed=", 1)[1].strip() if packed_line else None,
    }


def run_peft(args, tmp: Path) -> dict:
    out = tmp / "peft.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).with_name("peft_prefix_epoch.py")), str(args.model), str(args.data), str(out)]
    cmd += ["--max-length", str(args.max_length), "--micro", str(args.micro), "--lr", str(args.lr)]
    cmd += ["--max-steps", str(args.max_steps or 0)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        raise SystemExit(f"the PEFT run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def padding_share(args) -> dict:
    """Padding's share of the token positions a padded epoch computes (the micro-batches the
    padded run takes: same seed, shuffle and collator), and of the packed run's rows."""
    from transformers import AutoTokenizer

    from ptv2.data import BatchStream, collator, load_examples
    from ptv2.infer import pad_id
    from ptv2.packing import pack, packed_collator
    from ptv2.settings import DataSettings

    data = DataSettings(
        train_file=str(args.data / "train.jsonl"),
        prompt_template="User: {prompt}\nAssistant:",
        max_length=args.max_length,
    )
    tok = AutoTokenizer.from_pretrained(args.model)
    examples = load_examples(data.train_file, data, "causal-lm", None, tok)
    out = {}
    for name, rows, micro, collate in (
        ("padded", examples, args.micro, collator(tok, "causal-lm")),
        ("packed", pack(examples, args.max_length, 0), args.packed_micro, packed_collator(pad_id(tok))),
    ):
        real = computed = 0
        for rank in (0, 1):
            stream = BatchStream(rows, micro, rank, 2, 0)
            batches = stream.from_micro(0)
            for _ in range(stream.per_epoch):
                mask = collate(next(batches))["attention_mask"]
                real, computed = real + int(mask.sum()), computed + mask.numel()
        out[name] = 1 - real / computed
    out["examples"] = len(examples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "data" / "models" / "smollm2-135m")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "chat")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8, help="examples per padded micro-batch per worker")
    ap.add_argument("--packed-micro", type=int, default=2, help="packed rows per micro-batch per worker")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="cap every run (0: one epoch)")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 steps each")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.max_steps = 1, 3
    dev = check_splits(args.data / "train.jsonl", args.data / "dev.jsonl")
    share = padding_share(args)
    print(f"padding share of a padded epoch {share['padded']:.1%}, of the packed rows {share['packed']:.1%}")
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    t_start = time.time()
    for rnd in range(args.rounds):
        order = MODES[rnd % 3 :] + MODES[: rnd % 3]
        for mode in order:
            with tempfile.TemporaryDirectory(prefix=f"ptv2-pack-{mode}-") as tmp:
                r = run_peft(args, Path(tmp)) if mode == "peft" else run_ptv2(args, Path(tmp), mode == "packed")
            runs[mode].append(r)
            print(
                f"round {rnd} {mode}: epoch {r['train_s']:.1f} s, {r['steps']} steps, "
                f"{r['tokens_per_s']:.0f} tokens/s, eval loss {r['eval_loss']:.4f}",
                flush=True,
            )
    med = {
        m: {k: statistics.median(r[k] for r in runs[m]) for k in ("train_s", "tokens_per_s", "eval_loss")}
        for m in MODES
    }
    result = {
        "packed_over_padded_epoch": med["packed"]["train_s"] / med["padded"]["train_s"],
        "packed_over_peft_epoch": med["packed"]["train_s"] / med["peft"]["train_s"],
        "padding_share_unpacked": share["padded"],
        "padding_share_packed": share["packed"],
        "medians": med,
        "runs": runs,
        "setup": {
            "model": args.model.name,
            "examples": share["examples"],
            "dev_examples": dev,
            "max_length": args.max_length,
            "micro_padded": args.micro,
            "micro_packed_rows": args.packed_micro,
            "workers": 2,
            "rounds": args.rounds,
            "max_steps": args.max_steps,
            "wall_s": time.time() - t_start,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
