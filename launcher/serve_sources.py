"""Where `ptv2 serve`'s prompts come from and how a replica keeps its bank in step.

A source is a folder, a run id, `runs:/RUN/PATH` or a registry URI (`models:/NAME/VERSION`,
`models:/NAME@ALIAS`), pinned to the run artifact it means now and fetched (every checksum
verified) into a local cache. The application's catalogue says which prompts it serves, each
pinned; every replica reconciles its bank with it (`ReplicaPrompts`): removed entries leave,
re-pinned ones are reloaded (the old version serves until the new one is verified), a version
that fails to load is tried again after a backoff, and aliases are re-resolved on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock

from launcher.prompts import FetchError, fetch, resolve
from ptv2.artifact import ArtifactError, read_manifest

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Entry:
    """A prompt the application serves: its name, the source as given, what that source means now
    (`pinned`: runs:/RUN/PATH for registry and run sources, else the folder) and the registry
    version behind it (None for runs and folders)."""

    name: str
    source: str
    pinned: str
    version: str | None = None
    base: str | None = None  # the base model its manifest names (the prompts a server starts with)

    def moved(self, pinned: str, version: str | None) -> Entry:
        return replace(self, pinned=pinned, version=version)


class ServeError(ValueError):
    """A serve command line or prompt source that cannot work (before anything starts)."""


def is_registry(source: str) -> bool:
    return source.startswith(("models:/", "runs:/")) or bool(RUN_ID.fullmatch(source))


def is_alias(source: str) -> bool:
    return source.startswith("models:/") and "@" in source


def pin(uri: str | None, source: str, name: str = "") -> Entry:
    """What `source` means now (as prompt `name`): pinned to runs:/RUN/PATH for registry and run
    sources (an alias resolved to its current version), else to the folder."""
    if not isinstance(source, str) or not source or len(source) > 1000:
        raise FetchError(f"prompt source {source!r} is not a folder, run id, runs:/RUN/PATH or models:/ URI")
    path = Path(source).expanduser()
    if not is_registry(source) or path.is_dir():
        if not path.is_dir():
            raise FetchError(
                f"prompt source {source!r} is no folder here, nor a run id, runs:/RUN/PATH, "
                "models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        return Entry(name, source, str(path.resolve()))
    run_id, artifact, version = resolve(uri, source)
    return Entry(name, source, f"runs:/{run_id}/{artifact}", version)


def materialize(uri: str | None, pinned: str, cache_dir: str | Path) -> Path:
    """A local folder holding the pinned prompt: the folder itself, or a verified fetch of the run
    artifact into `cache_dir` (kept: a run's artifact never changes, and a finished job's is never
    rewritten; the bank re-verifies every checksum when it loads it, and a cached copy that fails
    is fetched again). Replicas on one host share the cache: one fetches an entry at a time (a
    file lock per entry), the others then find it there."""
    if not pinned.startswith("runs:/"):
        return Path(pinned)
    run_id, _, artifact = pinned.removeprefix("runs:/").partition("/")
    out = Path(cache_dir) / run_id / re.sub(r"[^A-Za-z0-9._-]", "_", artifact)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if out.is_dir():
            try:
                read_manifest(out)
                return out
            except ArtifactError:
                pass
        fetch(uri, pinned, out, force=True)
    return out


def default_name(source: str) -> str:
    """A prompt's name when none is given: the registered name, the run, or the folder's name."""
    if source.startswith("models:/"):
        name = re.split(r"[/@]", source.removeprefix("models:/"))[0]
    elif source.startswith("runs:/") or RUN_ID.fullmatch(source):
        name = "run-" + source.removeprefix("runs:/")[:8]
    else:
        name = Path(source).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:128]
    if not name:
        raise ServeError(f"cannot name the prompt {source!r}: give it as --prompt NAME={source}")
    return name


def startup_entries(uri: str | None, named: list[tuple[str, str]], cache_dir: str | Path) -> list[Entry]:
    """Pin and fetch (verifying every checksum) the prompts the server starts with; refuses a
    bad source or a duplicate name before anything starts. Entries carry the manifest's base."""
    from ptv2.serving import ServingError, check_name  # the model code (transformers): not for `ptv2 --help`

    entries, seen = [], {}
    for name, source in named:
        try:
            check_name(name)
        except ServingError as e:
            raise ServeError(str(e)) from e
        if name in seen:
            raise ServeError(f"two prompts are named {name!r} ({seen[name]} and {source}): name them with --prompt")
        seen[name] = source
        try:
            entry = pin(uri, source, name)
            manifest = read_manifest(materialize(uri, entry.pinned, cache_dir))
        except (FetchError, ArtifactError) as e:
            raise ServeError(f"prompt {name!r}: {e}") from e
        entries.append(replace(entry, base=manifest["base_model"]["name_or_path"]))
    return entries


logger = logging.getLogger("ptv2.serve")


class LoadFailures:
    """Prompt versions that did not load on this replica, retried with backoff: a fetch can fail
    for a moment (the tracking server restarting, the network), and a replica that never tried
    again would serve the old version while the others serve the new one."""

    FIRST_S, MAX_S = 5.0, 300.0

    def __init__(self) -> None:
        self._failed: dict[str, dict] = {}  # name -> {"pinned", "version", "error", "at", "attempts"}

    def record(self, name: str, entry: Entry, error: str, now: float) -> None:
        same = self._failed.get(name, {}).get("pinned") == entry.pinned
        attempts = self._failed[name]["attempts"] + 1 if same else 1
        self._failed[name] = {
            "pinned": entry.pinned,
            "version": entry.version,
            "error": error,
            "at": now,
            "attempts": attempts,
        }

    def clear(self, name: str) -> None:
        self._failed.pop(name, None)

    def may_try(self, name: str, pinned: str, now: float) -> bool:
        """False while `pinned` failed on its last try and its backoff (doubling from FIRST_S to
        MAX_S) has not passed."""
        f = self._failed.get(name)
        if f is None or f["pinned"] != pinned:
            return True
        return now - f["at"] >= min(self.MAX_S, self.FIRST_S * 2 ** (f["attempts"] - 1))

    def get(self, name: str) -> dict | None:
        f = self._failed.get(name)
        return None if f is None else {k: f[k] for k in ("pinned", "version", "error", "attempts")}


class PromptUnavailable(RuntimeError):
    """A prompt the catalogue serves that this replica could not load (its source, the network)."""


class ReplicaPrompts:
    """One replica's bank in step with the application's catalogue (see the module docstring).
    `catalog`: the catalogue deployment's handle (`entries`, `put`, `remove`)."""

    def __init__(self, bank, catalog, tracking_uri: str | None, cache_dir: str, sync_s: float, on_event=None) -> None:
        """`on_event(event, name)`: the bank's hits, loads and evictions (the replica's metrics)."""
        self.bank, self.catalog, self.sync_s = bank, catalog, sync_s
        self.on_event = on_event or (lambda event, name: None)
        self.tracking_uri, self.cache_dir = tracking_uri, cache_dir
        self.entries: dict[str, dict] = {}
        self.failures = LoadFailures()  # prompt versions that did not load here, retried with backoff
        self._loading: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._sync_lock = asyncio.Lock()
        self._synced = 0.0

    async def sync(self, force: bool = False, strict: bool = False) -> None:
        """Reconcile the bank with the catalogue (at most every sync_s unless forced); `strict`:
        every entry must load (the prompts a server starts with)."""
        if not force and time.monotonic() - self._synced < self.sync_s:
            return
        async with self._sync_lock:
            self.entries = {e.name: e for e in await self.catalog.entries.remote()}
            self._synced = time.monotonic()
            for name in self.bank.names():
                if name not in self.entries:
                    self.bank.remove(name)
            # a snapshot: loads await, and meanwhile requests add, remove and move entries
            for name, entry in list(self.entries.items()):
                loaded = self.bank.peek(name)
                stale = loaded is not None and loaded.source != entry.pinned
                if strict or (stale and self.failures.may_try(name, entry.pinned, time.monotonic())):
                    try:
                        await self.load(entry)
                    except Exception as e:
                        if strict:
                            raise
                        logger.warning("prompt %s: %s stays; %s did not load: %s", name, loaded.source, entry.pinned, e)

    async def load(self, entry: Entry):
        """Fetch (if need be), verify and load `entry` into the bank."""
        name = entry.name
        async with self._loading[name]:
            loaded = self.bank.peek(name)
            if loaded is not None and loaded.source == entry.pinned:
                return loaded
            try:
                path = await asyncio.to_thread(materialize, self.tracking_uri, entry.pinned, self.cache_dir)
                prompt, evicted = await asyncio.to_thread(self.bank.load, name, path, entry.pinned)
            except Exception as e:
                self.failures.record(name, entry, str(e), time.monotonic())
                raise
            self.failures.clear(name)
            self.on_event("load", name)
            for gone in evicted:
                self.on_event("eviction", gone)
            if evicted:
                logger.info("prompt %s loaded; evicted (least recently used): %s", name, ", ".join(evicted))
            return prompt

    async def get(self, name: str):
        """The loaded prompt `name`, loading it if the catalogue has it (evicted, or added on
        another replica); UnknownPrompt naming the prompts served otherwise, PromptUnavailable
        when it is served but does not load here."""
        from ptv2.serving import UnknownPrompt, check_name  # (imported by the replica already)

        check_name(name)
        await self.sync()
        loaded = self.bank.peek(name)
        if loaded is not None:
            self.on_event("hit", name)
            return self.bank.get(name)  # counts as a use (least recently used out)
        if name not in self.entries:
            await self.sync(force=True)
        if name not in self.entries:
            raise UnknownPrompt(name, list(self.entries))
        try:
            return await self.load(self.entries[name])
        except (ArtifactError, FetchError, OSError) as e:
            raise PromptUnavailable(f"prompt {name!r} is served but could not be loaded: {e}") from e

    async def pin(self, name: str, source: str) -> Entry:
        """The catalogue entry `source` means now, as `name` (FetchError: no such source)."""
        return await asyncio.to_thread(pin, self.tracking_uri, source, name)

    async def add(self, entry: Entry):
        """Verify here and load `entry` (from `pin`), then put it in the catalogue."""
        prompt = await self.load(entry)
        await self.catalog.put.remote(entry)
        self.entries[entry.name] = entry
        return prompt

    async def remove(self, name: str) -> bool:
        if not await self.catalog.remove.remote(name):
            return False
        self.entries.pop(name, None)
        self.bank.remove(name)
        return True

    async def refresh(self) -> list[dict]:
        """Re-resolve every alias; a moved one is verified here first, then the catalogue moves."""
        await self.sync(force=True)
        changes = []
        for entry in list(self.entries.values()):
            if not is_alias(entry.source):
                continue
            try:
                now = await asyncio.to_thread(pin, self.tracking_uri, entry.source, entry.name)
            except FetchError as e:
                changes.append({"name": entry.name, "error": str(e)})
                continue
            if now.pinned == entry.pinned:
                continue
            moved = entry.moved(now.pinned, now.version)
            if not self.failures.may_try(entry.name, moved.pinned, time.monotonic()):
                continue  # refused a moment ago: reported in GET /v1/prompts, tried again later
            try:
                await self.load(moved)
            except Exception as e:
                changes.append({"name": entry.name, "version": moved.version, "error": str(e)})
                continue
            if await self.catalog.put.remote(moved, entry.pinned):
                changes.append({"name": entry.name, "from": entry.version, "to": moved.version})
            self.entries[entry.name] = moved
        return changes

    async def refresh_every(self, seconds: float) -> None:
        while seconds > 0:
            await asyncio.sleep(seconds)
            try:
                for change in await self.refresh():
                    logger.info("alias refresh: %s", change)
            except Exception:
                logger.exception("alias refresh failed")

    def listing(self) -> list[dict]:
        """GET /v1/prompts: every catalogue entry, what is loaded of it here, its last failure."""
        rows = []
        for name, entry in sorted(self.entries.items()):
            loaded = self.bank.peek(name)
            row = {"name": name, "source": entry.source, "version": entry.version, "loaded": bool(loaded)}
            if loaded is not None:
                row.update({k: v for k, v in loaded.describe().items() if k not in row and k != "source"})
                row["pinned"] = loaded.source
                row["weights_sha256"] = loaded.weights_sha256()
            failure = self.failures.get(name)
            if failure is not None:
                row["error"] = failure
            rows.append(row)
        return rows
