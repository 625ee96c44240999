"""Single-process example: a deep prompt + classification head on the real MiniLM for the real
Pang & Lee polarity sentences. `make demo` runs it after `python -m ptv2.assets --out data`.

It reads top to bottom: load the frozen model, wrap it with a prompt, train with AdamW, compare
held-out accuracy before and after, save the prompt artifact and load it back to check it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ptv2.artifact import load_prompt, save_prompt
from ptv2.assets import minilm_path
from ptv2.model import PromptedModel, load_base_model
from ptv2.settings import PromptConfig

LABELS = ["negative", "positive"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def batches(rows: list[dict], tokenizer, size: int, shuffle: bool, seed: int = 0):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i : i + size]]
        enc = tokenizer([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=96)
        enc["labels"] = torch.tensor([LABELS.index(r["label"]) for r in chunk])
        yield enc


@torch.no_grad()
def accuracy(model: PromptedModel, rows: list[dict], tokenizer) -> float:
    model.eval()
    correct = 0
    for enc in batches(rows, tokenizer, 128, shuffle=False):
        correct += int((model(**enc).logits.argmax(-1) == enc["labels"]).sum())
    return correct / len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a P-Tuning v2 prompt on MiniLM for polarity (single process).")
    ap.add_argument("--data", type=Path, default=Path("data"), help="folder prepared by `python -m ptv2.assets`")
    ap.add_argument("--out", type=Path, default=Path("runs/demo/prompt"), help="where the prompt artifact goes")
    ap.add_argument("--length", type=int, default=16, help="prefix length (default 16)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = read_jsonl(args.data / "polarity" / "train.jsonl")
    test = read_jsonl(args.data / "polarity" / "test.jsonl")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base, new_params = load_base_model(path, "seq-cls", LABELS)
    model = PromptedModel(base, PromptConfig(method="ptv2", length=args.length), "seq-cls")

    n_train = sum(p.numel() for _, p in model.trainable_parameters())
    n_base = sum(p.numel() for p in base.parameters())
    print(f"base model: {path.name} ({n_base / 1e6:.1f}M parameters, frozen); newly initialised: {new_params}")
    print(f"trainable: {n_train:,} parameters = {100 * n_train / n_base:.3f}% of the model")
    print(f"data: {len(train)} training / {len(test)} held-out sentences")
    before = accuracy(model, test, tokenizer)
    print(f"held-out accuracy before training (untrained head): {before:.3f}")

    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        for enc in batches(train, tokenizer, args.batch_size, shuffle=True, seed=args.seed + epoch):
            loss = model(**enc).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0 or step == steps:
                eta = (time.time() - t0) / step * (steps - step)
                print(f"epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} eta {eta:.0f}s", flush=True)
        print(f"epoch {epoch + 1}: held-out accuracy {accuracy(model, test, tokenizer):.3f}", flush=True)

    after = accuracy(model, test, tokenizer)
    print(f"held-out accuracy after training: {after:.3f} (before: {before:.3f})")
    out = save_prompt(model, args.out, base_name_or_path=str(path), labels=LABELS, overwrite=True)
    reloaded = load_prompt(out, load_base_model(path, "seq-cls", LABELS)[0])
    print(f"prompt saved to {out}; reloaded accuracy {accuracy(reloaded, test, tokenizer):.3f}")


if __name__ == "__main__":
    main()
