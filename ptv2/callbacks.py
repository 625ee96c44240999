"""Metric events of a training run. Tracking (MLflow, Ray reports) plugs in here, so that the
library never imports them. Every rank calls every hook; `rank` says which one is calling."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Callback:
    def on_train_start(self, rank: int, info: dict) -> None: ...
    def on_step(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_test(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    # `digest`: sha256 over every rank's marker of checkpoint `name` (what a resume verifies)
    def on_checkpoint(self, rank: int, step: int, name: str, location: str, digest: str) -> None: ...
    # kind: final | best; `path` is rank 0's local copy, `location` where it is kept in storage
    def on_artifact(self, rank: int, step: int, path: Path, kind: str, location: str) -> None: ...
    def on_train_end(self, rank: int, summary: dict) -> None: ...


class ConsoleLogger(Callback):
    """Progress on rank 0: step, loss, learning rate, tokens/s and ETA."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.t0 = time.time()

    def _print(self, rank: int, text: str) -> None:
        if rank == 0:
            print(f"[ptv2] {text}", file=self.stream, flush=True)

    def on_train_start(self, rank, info):
        self._print(rank, " ".join(f"{k}={v}" for k, v in info.items()))

    def on_step(self, rank, step, m):
        # DeepSpeed reports no gradient norm for a stage-0 fp32 engine (it clips, but keeps no norm)
        norm = f"grad_norm {m['grad_norm']:.3f} " if "grad_norm" in m else ""
        self._print(
            rank,
            f"step {step}/{int(m['total_steps'])} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"{norm}tokens/s {m['tokens_per_s']:.0f} eta {m['eta_s']:.0f}s",
        )

    def on_eval(self, rank, step, m):
        self._print(rank, f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))

    def on_test(self, rank, step, m):
        self._print(rank, "test (final prompt): " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))

    def on_checkpoint(self, rank, step, name, location, digest):
        self._print(rank, f"checkpoint step {step}: {location}")

    def on_artifact(self, rank, step, path, kind, location):
        self._print(rank, f"{kind} prompt artifact (step {step}): {location}")

    def on_train_end(self, rank, summary):
        self._print(rank, "done: " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "resources"))
        peaks = [v for k, v in summary.get("resources", {}).items() if k.endswith("/peak_rss_gib")]
        if peaks:
            self._print(rank, "peak memory per rank: " + ", ".join(f"{v:.2f} GiB" for v in peaks))
