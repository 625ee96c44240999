"""Where `ptv2 serve`'s prompts come from: a folder, a run id, `runs:/RUN/PATH` or a registry URI
(`models:/NAME/VERSION`, `models:/NAME@ALIAS`), pinned to the run artifact it means now and fetched
(every checksum verified) into a local cache."""

from __future__ import annotations

import re
from pathlib import Path

from filelock import FileLock

from launcher.prompts import FetchError, fetch, resolve
from ptv2.artifact import ArtifactError, read_manifest

RUN_ID = re.compile(r"[0-9a-f]{32}")


class ServeError(ValueError):
    """A serve command line or prompt source that cannot work (before anything starts)."""


def is_registry(source: str) -> bool:
    return source.startswith(("models:/", "runs:/")) or bool(RUN_ID.fullmatch(source))


def is_alias(source: str) -> bool:
    return source.startswith("models:/") and "@" in source


def pin(uri: str | None, source: str) -> dict:
    """What `source` means now: {"source", "pinned", "version"}; pinned is runs:/RUN/PATH for
    registry and run sources (an alias resolved to its current version), else the folder."""
    if not isinstance(source, str) or not source or len(source) > 1000:
        raise FetchError(f"prompt source {source!r} is not a folder, run id, runs:/RUN/PATH or models:/ URI")
    path = Path(source).expanduser()
    if not is_registry(source) or path.is_dir():
        if not path.is_dir():
            raise FetchError(
                f"prompt source {source!r} is no folder here, nor a run id, runs:/RUN/PATH, "
                "models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        return {"source": source, "pinned": str(path.resolve()), "version": None}
    run_id, artifact, version = resolve(uri, source)
    return {"source": source, "pinned": f"runs:/{run_id}/{artifact}", "version": version}


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


def startup_entries(uri: str | None, named: list[tuple[str, str]], cache_dir: str | Path) -> list[dict]:
    """Pin and fetch (verifying every checksum) the prompts the server starts with; refuses a
    bad source or a duplicate name before anything starts. Entries carry the manifest's base."""
    from ptv2.serving import ServingError, check_name

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
            entry = pin(uri, source)
            manifest = read_manifest(materialize(uri, entry["pinned"], cache_dir))
        except (FetchError, ArtifactError) as e:
            raise ServeError(f"prompt {name!r}: {e}") from e
        entries.append({"name": name, **entry, "base": manifest["base_model"]["name_or_path"]})
    return entries
