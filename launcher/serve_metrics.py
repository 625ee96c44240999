"""What `ptv2 serve` tells an operator, through `ray.serve.metrics`: Ray exports them, with Ray
Serve's own (`ray_serve_num_http_requests_total`, latencies, replica counts, ...), in Prometheus
format on every node's metrics port (`ray start --metrics-export-port`, or `ptv2 serve
--metrics-port`), each name prefixed `ray_` and counters suffixed `_total`:

    ptv2_requests{route, prompt, status}           answered requests ("prompt" empty until one is found)
    ptv2_prompt_tokens{prompt}, ptv2_completion_tokens{prompt}
    ptv2_time_to_first_token_s{prompt}             histogram: arrival to the first token sampled
    ptv2_time_per_output_token_s{prompt}           histogram: decode time per token after the first
    ptv2_decode_steps, ptv2_decode_rows            occupancy = rate(rows) / rate(steps)
    ptv2_predict_batches, ptv2_predict_rows        rows per prediction forward, likewise
    ptv2_bank_events{event}                        hit | load | eviction of the replica's prompt bank

Ray adds the deployment, replica and application tags. Prompt names are the only per-request
label, and only names the server serves reach it (an unknown name is counted as "").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger("ptv2.serve")
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PER_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class ServeMetrics:
    """One replica's metrics (Ray aggregates the replicas')."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            "ptv2_requests",
            "requests answered, by route, prompt and HTTP status",
            tag_keys=("route", "prompt", "status"),
        )
        self.prompt_tokens = Counter("ptv2_prompt_tokens", "input tokens of generations", tag_keys=("prompt",))
        self.completion_tokens = Counter("ptv2_completion_tokens", "tokens generated", tag_keys=("prompt",))
        self.ttft = Histogram(
            "ptv2_time_to_first_token_s", "arrival to first token, seconds", LATENCY_S, tag_keys=("prompt",)
        )
        self.tpot = Histogram(
            "ptv2_time_per_output_token_s",
            "seconds per generated token after the first",
            PER_TOKEN_S,
            tag_keys=("prompt",),
        )
        self.decode_steps = Counter("ptv2_decode_steps", "decode steps of the generation batch")
        self.decode_rows = Counter("ptv2_decode_rows", "rows running, summed over decode steps")
        self.predict_batches = Counter("ptv2_predict_batches", "prediction forwards")
        self.predict_rows = Counter("ptv2_predict_rows", "rows of prediction forwards")
        self.bank = Counter("ptv2_bank_events", "prompt bank: hit, load, eviction", tag_keys=("event",))
        self._seen: dict[str, int] = {}

    def request(self, route: str, prompt: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "prompt": prompt, "status": str(status)})

    def generation(self, prompt: str, prompt_tokens: int, completion_tokens: int, ttft: float, decode_s: float) -> None:
        tags = {"prompt": prompt}
        self.prompt_tokens.inc(prompt_tokens, tags=tags)
        self.completion_tokens.inc(completion_tokens, tags=tags)
        self.ttft.observe(ttft, tags=tags)
        if completion_tokens > 1:
            self.tpot.observe(decode_s / (completion_tokens - 1), tags=tags)

    def bank_event(self, event: str, name: str) -> None:
        self.bank.inc(tags={"event": event})

    def batches(self, stats) -> None:
        """Add what the model thread did since the last call (`ptv2.scheduler.Stats`)."""
        for key, counter in (
            ("decode_steps", self.decode_steps),
            ("decode_rows", self.decode_rows),
            ("predict_batches", self.predict_batches),
            ("predict_rows", self.predict_rows),
        ):
            now = getattr(stats, key)
            new = now - self._seen.get(key, 0)
            if new > 0:
                counter.inc(new)
            self._seen[key] = now

    async def follow(self, stats, every_s: float = 1.0) -> None:
        """Copy the model thread's counts into the metrics every `every_s` (it never waits on Ray's)."""
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                self.batches(stats)
