"""Training checkpoints: small (no frozen weight is saved), atomic, verified on resume.

    CHECKPOINTS/step-00000040/   DeepSpeed's files (trainable params, optimizer, scheduler)
                                 + state.json (step, data position, best metric)
                                 + rng-rank<r>.pt (every rank's RNG states)
                                 + COMPLETE.json (sha256 of every file above, written last)

Every rank saves into `.tmp-step-…`; after a barrier rank 0 checksums the files, writes
COMPLETE.json and renames the folder. A crash mid-save leaves only a `.tmp-` folder; a
checkpoint whose files no longer match their checksums (truncated, corrupted) is skipped and the
previous complete one is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ptv2.artifact import sha256_file
from ptv2.distributed import barrier

COMPLETE = "COMPLETE.json"
STATE = "state.json"


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, state: dict, rank: int, keep: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder."""
    tmp_tag, tag = f".tmp-{_tag(step)}", _tag(step)
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False, exclude_frozen_parameters=True)
    tmp = root / tmp_tag
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier()
    final = root / tag
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / (COMPLETE + ".tmp")).write_text(json.dumps({"step": step, "files": files}, indent=2))
        os.replace(tmp / (COMPLETE + ".tmp"), tmp / COMPLETE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for orphan in root.glob(".tmp-step-*"):
        shutil.rmtree(orphan, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None when `path` is a complete, intact checkpoint; otherwise why not."""
    marker = path / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE.json)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable {COMPLETE}: {e}"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def newest_complete(root: Path, log=print) -> Path | None:
    """The newest intact checkpoint under `root`, reporting the ones skipped."""
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path.name}: {problem}")
    return None


def choose_resume(root: Path, rank: int, log=print) -> Path | None:
    """Rank 0 picks the checkpoint and tells the others (they must agree)."""
    choice = [str(newest_complete(root, log)) if rank == 0 and root.is_dir() else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def load(engine, path: Path, rank: int) -> dict:
    """Collective. Restores DeepSpeed's state and this rank's RNG; returns state.json."""
    engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / STATE).read_text())
