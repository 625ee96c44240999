"""Finding prompts again: run listing, fetch with verification, the prompt registry, the UI.

Sources for `fetch`: a run id (its `prompt` artifact), `runs:/RUN/PATH`, `models:/NAME/VERSION`
or `models:/NAME@ALIAS`. A fetch lists the artifact names first and refuses any that would
escape the output folder, downloads into a temporary folder beside it, verifies every checksum
and shape against the manifest, and only then renames it into place.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from ptv2 import tracking
from ptv2.artifact import ArtifactError, read_manifest
from ptv2.tracking import Tracker, TrackingError


class FetchError(ValueError):
    pass


def resolve(uri: str | None, source: str) -> tuple[str, str, str | None]:
    """(run_id, artifact path, registry version) behind a run id, runs:/ or models:/ URI; the
    version is None for run sources. An alias resolves to the version it points at now."""
    if source.startswith("models:/"):
        m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", source)
        if not m:
            raise FetchError(f"{source!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
        name, version, alias = m.groups()
        try:
            mv = Tracker(uri).model_version(name, version, alias)
        except TrackingError as e:
            raise FetchError(f"{source}: {e}") from e
        return mv.run_id, mv.artifact, mv.version
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        if not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise FetchError(f"{source!r}: {run_id!r} is not a run id")
        return run_id, path or "prompt", None
    if re.fullmatch(r"[0-9a-f]{32}", source):
        return source, "prompt", None
    raise FetchError(f"{source!r} is not a run id, runs:/RUN/PATH, models:/NAME/VERSION or models:/NAME@ALIAS")


def check_names(names: list[str], root: str) -> None:
    """Refuse artifact names that would land outside the output folder."""
    for name in names:
        rel = PurePosixPath(name)
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if rel.is_absolute() or ".." in parts or "\\" in name or not name.startswith(root.rstrip("/") + "/"):
            raise FetchError(f"artifact name {name!r} escapes the output folder; refusing to fetch")


def fetch(uri: str | None, source: str, out: Path, force: bool = False) -> dict:
    """Download and verify a prompt into `out`; returns its manifest."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FetchError(f"{out} exists and is not empty; use --force to replace it")
    run_id, path, _ = resolve(uri, source)
    tracker = Tracker(uri)
    try:
        names = tracker.artifact_files(run_id, path)
    except TrackingError as e:
        raise FetchError(str(e)) from e
    if not names:
        raise FetchError(f"run {run_id} has no artifacts under {path!r}")
    check_names(names, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in names:
            rel = PurePosixPath(name).relative_to(path)
            local = tracker.download_artifact(run_id, name, tmp / "dl")
            target = tmp / "prompt" / Path(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(local), target)
        shutil.rmtree(tmp / "dl", ignore_errors=True)
        try:
            manifest = read_manifest(tmp / "prompt")
        except ArtifactError as e:
            raise FetchError(f"{source}: verification failed: {e}") from e
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "prompt", out)
        out.chmod(0o755)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def register(uri: str | None, run_id: str, name: str, path: str = "prompt") -> str:
    """A new version of registered prompt `name` pointing at the run's prompt artifact."""
    try:
        return Tracker(uri).register_prompt(run_id, name, path)
    except TrackingError as e:
        raise FetchError(str(e)) from e


def promote(uri: str | None, name: str, version: str, alias: str) -> None:
    Tracker(uri).set_alias(name, alias, version)


def runs_table(uri: str | None, experiment: str | None, sort: str | None, limit: int = 50) -> list[dict]:
    tracker = Tracker(uri)
    if experiment is not None and tracker.experiment_id(experiment, create=False) is None:
        raise FetchError(f"no experiment {experiment!r}")
    rows = []
    for r in tracker.runs(experiment, order_by=sort, limit=limit):
        p, m = r.params, r.metrics
        rows.append(
            {
                "run_id": r.run_id,
                "name": r.name,
                "status": r.status,
                "model": Path(p.get("model.name_or_path", "")).name,
                "task": p.get("model.task", ""),
                "method": p.get("prompt.method", ""),
                "length": p.get("prompt.length", ""),
                "lr": p.get("train.lr", ""),
                **{k: m[k] for k in sorted(m) if k.startswith(("eval/", "final/"))},
            }
        )
    return rows


def ui_command(uri: str | None, host: str, port: int) -> list[str]:
    uri = tracking.resolve_uri(uri)
    if not uri.startswith("sqlite:///"):
        raise FetchError(f"ptv2 ui serves the local store; {uri} is already a server: open it in a browser")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--workers",
        "1",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        str(tracking.home() / "mlflow" / "artifacts"),
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve_ui(uri: str | None, host: str, port: int) -> int:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    link = tracking.ui_link(f"http://{host}:{port}")
    print(f"MLflow UI: {link}  (store {tracking.resolve_uri(uri)}; Ctrl-C stops it)", flush=True)
    return subprocess.call(ui_command(uri, host, port), env=env)
