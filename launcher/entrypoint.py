"""What a job submitted with `ptv2 submit` runs on the cluster (the Ray job's driver):

    python -m launcher.entrypoint SPEC --job-id JOB_ID [--resume] [--force]

A spec with a `sweep:` section runs as a sweep, any other as one job; both join the cluster's
Ray (`--address auto`). Exit status: 0 done, 2 the job cannot run (one line on stderr), 130
stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.runner import JobFailed, JobStopped, run_spec
from launcher.spec import SpecError, load_spec
from launcher.sweep import run_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a ptv2 job spec on the Ray cluster this process belongs to.")
    ap.add_argument("spec")
    ap.add_argument("--address", default="auto")
    ap.add_argument("--job-id", help="use this job id (ptv2 submit passes its own)")
    ap.add_argument("--resume", action="store_true", help="continue job --job-id from its newest checkpoint")
    ap.add_argument("--force", action="store_true", help="resume even a job whose run says it runs or finished")
    ap.add_argument("--submitted-at", type=float, help="when `ptv2 submit` sent the job (seconds since the epoch)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        text = Path(args.spec).read_text()
        if spec.sweep is not None:
            s = run_sweep(spec, text, address=args.address, sweep_id=args.job_id, resume=args.resume, force=args.force)
            print(f"[ptv2] sweep finished: best run {s.best_run_id}, {s.metric} {s.best_value:.4f}", flush=True)
            return 0
        summary = run_spec(
            spec,
            text,
            address=args.address,
            job_id=args.job_id,
            resume=args.resume,
            submitted_at=args.submitted_at,
            force=args.force,
        )
    except (SpecError, JobFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except JobStopped:
        print("[ptv2] stopped", flush=True)
        return 130
    print(f"[ptv2] finished: run {summary.run_id}, metrics {summary.metrics}, prompt {summary.artifact}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
