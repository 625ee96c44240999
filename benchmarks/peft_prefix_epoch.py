"""One epoch of PEFT prefix tuning the way PEFT is normally used: `get_peft_model` with a
`PrefixTuningConfig`, plain torch DDP over gloo (run under torchrun), a padding collator
(transformers' DataCollatorForSeq2Seq), AdamW with a linear schedule and gradient clipping at
1.0 — the settings of the ptv2 runs it is compared with (benchmarks/packing.py). The examples are
encoded by ptv2's own data code, so both train on the same token ids and labels (loss on the
reply and EOS only). Rank 0 writes the epoch's wall time, real tokens and dev loss as JSON.

    torchrun --nproc_per_node 2 benchmarks/peft_prefix_epoch.py MODEL DATA_DIR OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=0)
    args = ap.parse_args()

    from peft import PrefixTuningConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        get_linear_schedule_with_warmup,
    )

    from ptv2.data import ensure_pad_token, load_examples
    from ptv2.settings import DataSettings

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    ensure_pad_token(tok)
    tok.padding_side = "right"
    settings = DataSettings(
        train_file=str(args.data / "train.jsonl"),
        prompt_template="User: {prompt}\nAssistant:",
        max_length=args.max_length,
    )
    train = [dict(r) for r in load_examples(settings.train_file, settings, "causal-lm", None, tok)]
    dev = [dict(r) for r in load_examples(str(args.data / "dev.jsonl"), settings, "causal-lm", None, tok)]
    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, return_tensors="pt")

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))
    ddp = DistributedDataParallel(model)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.micro, sampler=sampler, collate_fn=collate)
    steps = len(loader) if not args.max_steps else min(args.max_steps, len(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(opt, 0, steps)

    ddp.train()
    tokens = 0
    dist.barrier()
    t0 = time.time()
    for step, batch in enumerate(loader, 1):
        loss = ddp(**batch).loss  # HF's mean over the labelled next tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        if rank == 0 and step % 5 == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.1f}s", flush=True)
        if step == steps:
            break
    dist.barrier()
    train_s = time.time() - t0

    # dev loss: mean over every labelled next token of the split, this rank's share then summed
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(rank * args.micro, len(dev), world * args.micro):
            batch = collate(dev[i : i + args.micro])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
            target = batch["labels"][:, 1:]
            sums[0] += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
            )
            sums[1] += int((target != -100).sum())
    dist.all_reduce(sums)
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:
        loss = float(sums[0] / sums[1])
        args.out.write_text(
            json.dumps(
                {
                    "train_s": train_s,
                    "tokens": float(total[0]),
                    "tokens_per_s": float(total[0]) / train_s,
                    "steps": steps,
                    "eval_loss": loss,
                    "eval_perplexity": math.exp(loss),
                    "trainable": sum(p.numel() for p in params),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
