"""Process groups for the three launch modes, and the few collectives the loop needs.

1. a single process: a group of one is created on 127.0.0.1;
2. `torchrun` / the `deepspeed` launcher: the group comes from their environment;
3. a worker whose group already exists (Ray Train): it is used as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALE_BUILD_LOCK_S = 600  # DeepSpeed's CPU ops build in well under a minute here


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch extension build locks older than `max_age_s`. torch takes a lock file while
    it JIT-builds an op (DeepSpeed's on first use) and waits, forever, for anyone's lock to go: a
    process killed mid-build (out of memory, a lost node) would hang every later job on the node."""
    root = extension_root()
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <root>[/<python_accelerator>]/<op>/lock
        with contextlib.suppress(FileNotFoundError):
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                logging.getLogger("ptv2").warning("removed a stale torch extension build lock: %s", lock)
    return removed


def extension_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_cpu_comm_op() -> None:
    """Build DeepSpeed's shared-memory collective op for its CPU accelerator, which
    `init_distributed` loads. torch JIT-compiles it on first use on a node (about a minute on two
    cores), so the set-up builds it once, up front, rather than inside the first job; a no-op on
    GPU accelerators, which have no such op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed then runs without it, as its own init_distributed does
    if not any(extension_root().glob(f"**/{builder.NAME}/*.so")):
        logging.getLogger("ptv2").info("building DeepSpeed's %s op (once per node, about a minute)", builder.NAME)
    clear_stale_build_locks()
    out = io.StringIO()
    # torch runs `ninja` from PATH: the environment's own (DeepSpeed requires the package) and a
    # system one write build logs in different formats, so each would find the other's build out
    # of date and compile again (about a minute). Always the environment's.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        with contextlib.redirect_stdout(out):  # its "built successfully" print
            builder.load(verbose=False)
    finally:
        os.environ["PATH"] = path


def _init_deepspeed(**kwargs) -> None:
    """deepspeed.init_distributed, with DeepSpeed's INFO chatter (and its print of the CPU
    communication op it loads) kept out of the console: the job's progress lines are what a
    user reads there."""
    import deepspeed

    build_cpu_comm_op()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        deepspeed.init_distributed(**kwargs)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for line in out.getvalue().splitlines():
        logging.getLogger("ptv2").debug(line)


def setup() -> Process:
    """Join (or create) the process group and pick this rank's device."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    backend = acc.communication_backend_name() if acc.device_name() != "cpu" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # mode 1: a single process
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        _init_deepspeed(dist_backend=backend)
    else:  # mode 3: DeepSpeed must adopt the existing group
        _init_deepspeed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return Process(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def all_gather(value: T) -> list[T]:
    """Collective: every rank's `value` (any picklable object), in rank order; `[value]` alone."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def broadcast(value: T, src: int = 0) -> T:
    """Collective: rank `src`'s `value` on every rank."""
    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def gathered(params, modifier_rank: int | None = None):
    """Collectively gather ZeRO-3 partitioned `params` (every rank must enter); a no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def gathered_per_module(model: torch.nn.Module):
    """Run forwards of a ZeRO-3 partitioned `model` outside a DeepSpeed engine: each submodule
    gathers its own parameters just before it runs and releases them after, so no rank ever
    holds more than one layer's weights whole (what the engine's hooks do). Collective: every
    rank must run the same forwards. A no-op for unpartitioned models."""
    handles = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if not own:
            continue
        stack: list = []

        def pre(_m, _args, own=own, stack=stack):
            ctx = gathered(own)
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
