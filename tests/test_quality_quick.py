"""The quality benchmark's quick mode, through the whole service (spec -> ptv2 run -> Ray ->
DeepSpeed -> MLflow) on the real MiniLM and the real polarity sentences: P-Tuning v2 must beat
the linear probe (frozen model, head only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parent.parent


# the suite's 600 s default is too close to this test's ~6 minutes on a busy 2-core machine; its
# subprocess has its own 900 s limit, which is the one that should end it
@pytest.mark.timeout(960)
def test_ptv2_beats_the_linear_probe_on_polarity(tmp_path):
    env = {
        **os.environ,
        "PTV2_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("quick: polarity test accuracy"))
    print(line)
