"""Training checkpoints in the job's storage: small (no frozen weight), per-rank, verified.

    STORAGE/<job>/checkpoints/step-00000040/
        ds/…                      DeepSpeed's files of every rank (trainable params, optimizer, scheduler)
        state.json                step, best metric, early stopping's counter (rank 0; `RunState`)
        rng-rank<r>.safetensors   each rank's RNG states, as tensors (no pickle to load)
        COMPLETE-rank<r>.json     sha256 of each file rank r wrote, uploaded after them

Every rank saves into its own local scratch folder and sends its files to the same checkpoint
folder in storage, so ranks on different nodes need no shared disk. A checkpoint counts only
when the marker of every rank is there and every file matches its checksum: a rank that died
mid-upload, or a truncated or corrupted file, makes it incomplete and the previous one is used.
How the files reach storage is the `Checkpoints.commit` step: a plain copy here (torchrun, a
single process), `ray.train.report` under Ray Train (launcher/runner.py).

Whoever can write to storage could plant files that DeepSpeed unpickles on resume, and rewrite the
markers to match. So a job run by the service also records each checkpoint's digest (over every
rank's marker) in its MLflow run, another trust domain, and a resume loads only a checkpoint whose
markers match that record (`restore(trusted=...)`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ptv2 import storage
from ptv2.artifact import sha256_file
from ptv2.distributed import all_gather, barrier, broadcast

STATE = "state.json"
DS_TAG = "ds"
_MARKER = re.compile(r"COMPLETE-rank(\d+)\.json")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def marker_name(rank: int) -> str:
    return f"COMPLETE-rank{rank}.json"


# ---- RNG state as tensors -----------------------------------------------------------------
def rng_tensors() -> dict[str, torch.Tensor]:
    """Every RNG the loop uses, as tensors (safetensors stores them; loading unpickles nothing)."""
    version, keys, gauss = random.getstate()
    _, mt, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python.keys": torch.tensor(keys, dtype=torch.int64),
        "python.meta": torch.tensor([version, 0 if gauss is None else 1], dtype=torch.int64),
        "python.gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy.mt": torch.from_numpy(mt.astype(np.int64)),
        "numpy.meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.cached": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_tensors(t: dict[str, torch.Tensor]) -> None:
    version, has_gauss = t["python.meta"].tolist()
    gauss = float(t["python.gauss"][0]) if has_gauss else None
    random.setstate((version, tuple(t["python.keys"].tolist()), gauss))
    pos, np_has_gauss = t["numpy.meta"].tolist()
    np.random.set_state(
        ("MT19937", t["numpy.mt"].numpy().astype(np.uint32), pos, np_has_gauss, float(t["numpy.cached"][0]))
    )
    torch.set_rng_state(t["torch"])
    cuda = [t[k] for k in sorted(k for k in t if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---- the loop's state ----------------------------------------------------------------------
@dataclass
class RunState:
    """Where a training run stands: what a checkpoint's state.json holds besides DeepSpeed's files."""

    step: int = 0
    best: float | None = None  # the best value of the job's objective metric so far
    best_step: int | None = None
    evals_since_best: int = 0  # evaluations without an improvement (early stopping's patience)
    stopped: str | None = None  # why the run stopped early, once it did

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        values = json.loads(text)
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})


class CheckpointError(ValueError):
    """A resume that cannot be done as asked (no checkpoint to trust); no retry can fix it."""


@dataclass(frozen=True)
class Saved:
    """A checkpoint every rank has committed: its name, where it is, and the digest of its markers
    (record it elsewhere to trust it later: `Checkpoints.restore(trusted=...)`)."""

    name: str
    location: str
    digest: str


# ---- one checkpoint in a local folder -------------------------------------------------------
def save_local(engine, folder: Path, step: int, state: RunState, rank: int, world: int) -> Path:
    """Collective. This rank's share of checkpoint `step` in `folder` (its own, local), its
    marker written last. Frozen weights are not saved: they come from the base model."""
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=True)
    save_file(rng_tensors(), folder / f"rng-rank{rank}.safetensors")
    if rank == 0:
        (folder / STATE).write_text(state.to_json())
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name[0] != "."
    }
    marker = {"step": step, "rank": rank, "world_size": world, "files": files}
    (folder / marker_name(rank)).write_text(json.dumps(marker, indent=2))
    return folder


def markers_digest(marker_sha256s: list[str]) -> str:
    """One digest for a checkpoint: over the sha256 of every rank's marker, in rank order (each
    marker holds the sha256 of every file its rank wrote)."""
    return hashlib.sha256("\n".join(f"{r}:{s}" for r, s in enumerate(marker_sha256s)).encode()).hexdigest()


def verify(folder: Path, world: int, trusted: str | None | bool = False) -> str | None:
    """None when `folder` holds a complete, intact checkpoint of `world` ranks; else why not.
    `trusted`: the markers' digest recorded when the checkpoint was saved (None: none was), or
    False to check the files against the markers alone."""
    markers = {int(m.group(1)): p for p in folder.glob("COMPLETE-rank*.json") if (m := _MARKER.fullmatch(p.name))}
    missing = sorted(set(range(world)) - set(markers))
    if missing:
        return f"incomplete (no marker from rank(s) {', '.join(map(str, missing))})"
    if trusted is not False:
        if trusted is None:
            return "not recorded in the job's MLflow run (a save that did not finish, or files this job did not write)"
        if markers_digest([sha256_file(markers[r]) for r in range(world)]) != trusted:
            return "its files differ from what the job's MLflow run recorded at its save (changed in storage since)"
    for rank in range(world):
        try:
            marker = json.loads(markers[rank].read_text())
            files = marker["files"]
        except (json.JSONDecodeError, KeyError) as e:
            return f"unreadable {markers[rank].name}: {e}"
        if marker.get("world_size", world) != world:
            return f"written by {marker['world_size']} ranks, this run has {world}"
        for name, digest in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if sha256_file(f) != digest:
                return f"{name} does not match its checksum (truncated or corrupted)"
    if not (folder / STATE).is_file():
        return f"{STATE} is missing"
    return None


def load_local(engine, folder: Path, rank: int) -> RunState:
    """Collective. Restores DeepSpeed's state and this rank's RNG; returns the run's state."""
    engine.load_checkpoint(
        str(folder), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rng = folder / f"rng-rank{rank}.safetensors"
    if rng.is_file():
        set_rng_tensors(load_file(rng))
    return RunState.from_json((folder / STATE).read_text())


# ---- checkpoints of a job in storage --------------------------------------------------------
class Checkpoints:
    """The checkpoints of one job under `location` (a path or URI): save, find, restore."""

    def __init__(self, location: str, keep: int = 2, trusted: Callable[[], Mapping[str, str]] | None = None) -> None:
        """`trusted`: where a resume reads the digests recorded when each checkpoint was saved
        (checkpoint name -> digest); None trusts whatever storage holds."""
        self.location = storage.normalize(location)
        self.keep, self.trusted = keep, trusted

    def names(self) -> list[str]:
        return [n for n in storage.listdir(self.location) if re.fullmatch(r"step-\d{8}", n)]

    def commit(self, folder: Path, name: str, rank: int) -> None:
        """Send this rank's files to storage; the marker goes last, so a rank that dies
        mid-upload leaves the checkpoint incomplete. Collective."""
        target = storage.join(self.location, name)
        marker = folder / marker_name(rank)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path != marker:
                storage.upload_file(path, storage.join(target, str(path.relative_to(folder))))
        storage.upload_file(marker, storage.join(target, marker.name))
        barrier()
        if rank == 0:
            self.prune()
        barrier()

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (judged by their markers' presence)."""
        complete = [n for n in self.names() if any(_MARKER.fullmatch(f) for f in storage.listdir(self.join(n)))]
        for old in complete[: -self.keep]:
            storage.delete(self.join(old))

    def join(self, name: str) -> str:
        return storage.join(self.location, name)

    def save(self, engine, scratch: Path, step: int, state: RunState, rank: int, world: int) -> Saved:
        """Collective: every rank writes its share locally and commits it."""
        name = tag(step)
        folder = scratch / "checkpoint-out" / name
        save_local(engine, folder, step, state, rank, world)
        digest = markers_digest(all_gather(sha256_file(folder / marker_name(rank))))
        try:
            self.commit(folder, name, rank)
        finally:
            storage.remove_scratch(folder)
        return Saved(name, self.join(name), digest)

    def restore(
        self,
        engine,
        scratch: Path,
        rank: int,
        world: int,
        log: Callable[[str], None],
        required: bool = False,
    ) -> RunState | None:
        """Collective. Load the newest checkpoint that is complete and intact (and, with `trusted`,
        matches the digest recorded at its save, in another trust domain than storage: nothing
        else is loaded, DeepSpeed unpickles its files) and return its state; skip, with the reason,
        any that is not. None when there is none, unless `required` (an explicit resume): then
        CheckpointError says why each one was refused."""
        candidates = self.names()
        local = scratch / "checkpoint-in"
        chosen, refused, digest = None, [], None
        if rank == 0:
            digests = dict(self.trusted()) if self.trusted is not None else None
            for name in reversed(candidates):
                folder = storage.download(self.join(name), local / name)
                problem = verify(folder, world, False if digests is None else digests.get(name))
                if problem is None:
                    chosen = name
                    digest = markers_digest([sha256_file(folder / marker_name(r)) for r in range(world)])
                    break
                refused.append(f"{name}: {problem}")
                log(f"skipping checkpoint {name}: {problem}")
                storage.remove_scratch(folder)
            if candidates and chosen is None and not required:
                log("no complete checkpoint: starting from the beginning")
        chosen, refused, digest = broadcast((chosen, refused, digest))
        if chosen is None:
            if required:
                why = "; ".join(refused) if refused else f"{self.location} holds none"
                raise CheckpointError(f"nothing to resume from: {why}")
            return None
        folder = local / chosen
        if rank != 0:
            storage.download(self.join(chosen), folder)
            problem = verify(folder, world, digest)  # exactly what rank 0 checked
            if problem is not None:  # storage changed under us: no retry can fix that
                raise storage.StorageError(f"checkpoint {self.join(chosen)} changed while loading: {problem}")
        try:
            state = load_local(engine, folder, rank)
        finally:
            barrier()
            storage.remove_scratch(local)
        log(f"resumed from checkpoint {chosen} (step {state.step})")
        return state
