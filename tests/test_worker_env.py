"""What a job's workers get in their environment, checked by what it does in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launcher.runner import worker_env
from launcher.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent

# allocate and free blocks the size of ZeRO-3's gather buffers (a freed large block first, as a
# released layer does), then keep one small tensor alive: how much stays resident?
CHURN = """
import json, psutil, torch
p = psutil.Process()
base = p.memory_info().rss
for _ in range(3):
    big = torch.ones(48 << 20, dtype=torch.uint8); del big          # > 32 MiB: mmapped, then freed
    layers = [torch.ones(24 << 20, dtype=torch.uint8) for _ in range(20)]  # 480 MiB of 24 MiB blocks
    keep = torch.ones(1024)
    del layers
print(json.dumps((p.memory_info().rss - base) / 2**20))
"""


def resident_after_churn(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN], env={**clean, **env}, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_workers_hand_freed_gather_buffers_back_to_the_os():
    env = worker_env(load_spec(ROOT / "jobs" / "quickstart.yaml", check_files=False))
    glibc_default = resident_after_churn({})
    with_worker_env = resident_after_churn({k: v for k, v in env.items() if k.startswith("MALLOC_")})
    assert glibc_default > 200, f"glibc kept {glibc_default:.0f} MiB: the premise of the setting changed"
    assert with_worker_env < 50, f"{with_worker_env:.0f} MiB stayed resident with the workers' environment"
