"""Events of a training run: progress on the console, and MLflow through `ptv2.tracking` (Ray's
reports plug in from the launcher). Every rank calls every hook; `rank` says which one is calling."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ptv2 import tracking


class Callback:
    def on_train_start(self, rank: int, info: dict) -> None: ...
    # rank 0 only, before the model loads: the data report of every split (`ptv2.report`)
    def on_data(self, rank: int, reports: list) -> None: ...
    def on_step(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    def on_test(self, rank: int, step: int, metrics: dict[str, float]) -> None: ...
    # `digest`: sha256 over every rank's marker of checkpoint `name` (what a resume verifies)
    def on_checkpoint(self, rank: int, step: int, name: str, location: str, digest: str) -> None: ...
    # kind: final | best; `path` is rank 0's local copy, `location` where it is kept in storage
    def on_artifact(self, rank: int, step: int, path: Path, kind: str, location: str) -> None: ...
    # early stopping: the run ends at `step`, its best evaluation (and final prompt) at `best_step`
    def on_stop(self, rank: int, step: int, reason: str, best_step: int) -> None: ...
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

    def on_data(self, rank, reports):
        for r in reports:
            self._print(
                rank,
                f"data {r.split}: {r.rows} rows, tokens p50 {r.tokens_p50} p95 {r.tokens_p95} max {r.tokens_max}, "
                f"{r.truncated_pct:.1f}% truncated",
            )
            for warning in r.warnings:
                self._print(rank, f"warning: data {r.split}: {warning}")

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

    def on_stop(self, rank, step, reason, best_step):
        self._print(rank, f"stopping early at step {step}: {reason}")

    def on_train_end(self, rank, summary):
        self._print(rank, "done: " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "resources"))
        peaks = [v for k, v in summary.get("resources", {}).items() if k.endswith("/peak_rss_gib")]
        if peaks:
            self._print(rank, "peak memory per rank: " + ", ".join(f"{v:.2f} GiB" for v in peaks))


class MlflowCallback(Callback):
    """Rank 0 logs step and eval metrics, the prompt artifacts and checkpoint digests to the
    driver's run."""

    def __init__(self, uri: str | None, run_id: str) -> None:
        self.tracker, self.run_id = tracking.Tracker(uri), run_id

    def on_train_start(self, rank, info):
        if rank == 0:
            self.tracker.set_info(self.run_id, info)

    def on_data(self, rank, reports):
        """Each split as an MLflow dataset input (the UI's "datasets used"), digest the file's
        sha256, context the split; the whole report as data_report.json and .txt."""
        from ptv2.data import read_table  # torch, pyarrow: the driver imports this module without them
        from ptv2.report import format_report

        if rank != 0:
            return
        for r in reports:
            frame = read_table(r.path, r.format).select(range(r.rows)).to_pandas()
            self.tracker.log_dataset(self.run_id, frame, r.path, r.split, r.sha256)
        self.tracker.log_text(self.run_id, json.dumps([r.to_dict() for r in reports], indent=2), "data_report.json")
        self.tracker.log_text(self.run_id, format_report(reports) + "\n", "data_report.txt")

    def on_train_end(self, rank, summary):
        if rank == 0 and summary.get("resources"):
            self.tracker.log_metrics(self.run_id, summary["steps"], summary["resources"])

    def on_step(self, rank, step, metrics):
        if rank == 0:
            shown = {k: v for k, v in metrics.items() if k != "total_steps"}
            self.tracker.log_metrics(self.run_id, step, shown, "train/")

    def on_eval(self, rank, step, metrics):
        if rank == 0:
            self.tracker.log_metrics(self.run_id, step, metrics, "eval/")

    def on_test(self, rank, step, metrics):
        if rank == 0:
            self.tracker.log_metrics(self.run_id, step, metrics, "test/")

    def on_artifact(self, rank, step, path, kind, location):
        if rank == 0:
            self.tracker.log_prompt(self.run_id, path, "prompt" if kind == "final" else kind)
            self.tracker.set_tags(self.run_id, {f"ptv2.{kind}_step": str(step), f"ptv2.{kind}_uri": location})

    def on_stop(self, rank, step, reason, best_step):
        if rank == 0:
            self.tracker.set_tags(
                self.run_id,
                {tracking.STOPPED: reason, tracking.STOPPED_AT: str(step), "ptv2.best_step": str(best_step)},
            )

    def on_checkpoint(self, rank, step, name, location, digest):
        if rank == 0:
            self.tracker.set_tags(
                self.run_id, {tracking.CHECKPOINT + name: digest, "ptv2.last_checkpoint": f"{step}: {location}"}
            )
