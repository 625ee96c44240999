"""Small helpers shared by the tests."""

from __future__ import annotations

import torch

from ptv2.model import PromptedModel


def set_prefix(model: PromptedModel, kv: torch.Tensor) -> None:
    """Load an explicit prefix [layers, 2, kv_heads, P, head_dim] into a plain PrefixEncoder."""
    rows = kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)
    with torch.no_grad():
        model.prompt.embedding.weight.copy_(rows)


def randomize_prompt(model: PromptedModel, seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def fit(model: PromptedModel, batch: dict, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


class FailOnce:
    """A training callback that kills rank `rank` once, at step `step` (a test's fault
    injection; the marker file makes the restarted run go on)."""

    def __init__(self, step: int, rank: int, marker) -> None:
        self.step, self.rank, self.marker = step, rank, str(marker)

    def __getattr__(self, hook):  # every other callback hook does nothing
        if hook.startswith("on_"):
            return lambda *args: None
        raise AttributeError(hook)

    def on_step(self, rank: int, step: int, metrics: dict) -> None:
        import os
        from pathlib import Path

        if rank == self.rank and step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text("1")
            print(f"[ptv2] test failure injected: rank {rank} exits at step {step}", flush=True)
            os._exit(1)


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, step: float = 0.5, context=lambda: ""):
    """`predicate()`'s first truthy value, polled every `step` seconds; AssertionError naming
    `what` (and `context()`) after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}\n{context()}")


class running_mlflow_server:  # noqa: N801 (a context manager, used like a function)
    """A real `mlflow server` on 127.0.0.1 (one worker, no job runner) over a SQLite store in
    `folder`, its artifacts in `artifacts` (a folder or s3:// URI); yields its URL. Only this
    process is stopped at the end."""

    def __init__(self, folder, artifacts) -> None:
        self.folder, self.artifacts = folder, str(artifacts)

    def __enter__(self) -> str:
        import os
        import subprocess
        import sys
        import urllib.request

        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--workers", "1"]
            + ["--backend-store-uri", f"sqlite:///{self.folder}/db.sqlite", "--artifacts-destination", self.artifacts]
            + ["--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                return True
            except OSError:
                return False

        try:
            wait_for(up, 60, "the mlflow server to answer /health")
        except AssertionError:
            self.proc.kill()
            raise
        return url

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def stop_serve(proc, log, *folders) -> None:
    """Stop a `ptv2 serve` process the test started (SIGINT: it stops Serve and its embedded Ray
    itself; its process group is killed only if it hangs), close its log, remove its folders."""
    import os
    import shutil
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def write_spec(
    folder,
    task: str = "causal-lm",
    arch: str = "llama",
    labels=None,
    n_train: int = 64,
    n_dev: int = 16,
    filename: str = "job.yaml",
    **sections,
):
    """A tiny model, synthetic train/dev data and a job spec over them in `folder`; returns the
    spec's path. `sections` are merged into the defaults (a nested dict merges, None removes a
    key); `name=None` writes the bare training sections `python -m ptv2.train` reads."""
    from pathlib import Path

    import yaml

    from tests.tiny import save_tiny, write_task_data

    folder = Path(folder)
    if not (folder / "model").exists():
        save_tiny(folder / "model", arch, task, labels)
    write_task_data(folder / "train.jsonl", task, n=n_train)
    write_task_data(folder / "dev.jsonl", task, n=n_dev, seed=1)
    spec = {
        "name": "tiny",
        "model": {"name_or_path": "model", "task": task, **({"labels": labels} if labels else {})},
        "prompt": {"length": 4},
        "data": {"train_file": "train.jsonl", "validation_file": "dev.jsonl", "max_length": 32},
        "train": {"max_steps": 8, "lr": 0.05, "micro_batch_size": 8, "log_every": 1, "eval_every": 4},
    }
    path = folder / filename
    path.write_text(yaml.safe_dump(_merged(spec, sections)))
    return path


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out
