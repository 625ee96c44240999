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
from ptv2.errors import first_line


class FetchError(ValueError):
    pass


def _client(uri: str | None):
    return tracking.client(uri)


def resolve_source(uri: str | None, source: str) -> tuple[str, str]:
    """(run_id, artifact path) behind a run id, runs:/ or models:/ URI."""
    run_id, path, _ = resolve(uri, source)
    return run_id, path


def resolve(uri: str | None, source: str) -> tuple[str, str, str | None]:
    """(run_id, artifact path, registry version) behind a run id, runs:/ or models:/ URI; the
    version is None for run sources. An alias resolves to the version it points at now."""
    c = _client(uri)
    if source.startswith("models:/"):
        m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", source)
        if not m:
            raise FetchError(f"{source!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
        name, version, alias = m.groups()
        try:
            mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
        except Exception as e:
            raise FetchError(f"{source}: {first_line(e, 200)}") from e
        m2 = re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", mv.source or "")
        if not m2:
            raise FetchError(f"{source}: its source {mv.source!r} is not a run artifact")
        return m2.group(1), m2.group(2), str(mv.version)
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return run_id, path or "prompt", None
    if re.fullmatch(r"[0-9a-f]{32}", source):
        return source, "prompt", None
    raise FetchError(f"{source!r} is not a run id, runs:/RUN/PATH, models:/NAME/VERSION or models:/NAME@ALIAS")


def list_files(c, run_id: str, path: str) -> list[str]:
    out, stack = [], [path]
    while stack:
        for info in c.list_artifacts(run_id, stack.pop()):
            (stack if info.is_dir else out).append(info.path)
    return out


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
    run_id, path = resolve_source(uri, source)
    c = _client(uri)
    try:
        names = list_files(c, run_id, path)
    except Exception as e:
        raise FetchError(f"run {run_id}: {first_line(e, 200)}") from e
    if not names:
        raise FetchError(f"run {run_id} has no artifacts under {path!r}")
    check_names(names, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in names:
            rel = PurePosixPath(name).relative_to(path)
            dest = tmp / "dl"
            local = Path(c.download_artifacts(run_id, name, str(dest)))
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
    c = _client(uri)
    c.get_run(run_id)  # a clear error for an unknown run
    if not list_files(c, run_id, path):
        raise FetchError(f"run {run_id} has no {path!r} artifact to register")
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, description="ptv2 prompt (P-Tuning v2 prefix + head)")
    mv = c.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id, tags={"ptv2.artifact": path})
    return str(mv.version)


def promote(uri: str | None, name: str, version: str, alias: str) -> None:
    _client(uri).set_registered_model_alias(name, alias, version)


def runs_table(uri: str | None, experiment: str | None, sort: str | None, limit: int = 50) -> list[dict]:
    c = _client(uri)
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    exps = [e for e in exps if e is not None]
    if not exps:
        raise FetchError(f"no experiment {experiment!r}" if experiment else "no experiments yet")
    order = [f"metrics.`{sort}` DESC"] if sort else ["attributes.start_time DESC"]
    runs = c.search_runs([e.experiment_id for e in exps], order_by=order, max_results=limit)
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        rows.append(
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "status": r.info.status,
                "model": Path(p.get("model.name_or_path", "")).name,
                "task": p.get("model.task", ""),
                "method": p.get("prompt.method", ""),
                "length": p.get("prompt.length", ""),
                "lr": p.get("train.lr", ""),
                **{k: m[k] for k in sorted(m) if k.startswith(("eval/", "final/"))},
            }
        )
    return rows


def sweep_table(uri: str | None, sweep_id: str) -> tuple[list[dict], list[str]]:
    """(rows, columns) of a sweep's trials, best first, read from MLflow."""
    from launcher.sweep import trials

    c = _client(uri)
    parents = c.search_runs(
        [e.experiment_id for e in c.search_experiments()],
        filter_string=f"tags.`ptv2.sweep_id` = '{sweep_id}' and tags.`ptv2.kind` = 'sweep'",
    )
    if not parents:
        raise FetchError(f"no sweep {sweep_id!r} in {tracking.resolve_uri(uri)}")
    parent = parents[0]
    tags, params = parent.data.tags, parent.data.params
    metric, mode = tags["ptv2.sweep_metric"], tags["ptv2.sweep_mode"]
    names = [k.removeprefix("sweep.parameters.") for k in params if k.startswith("sweep.parameters.")]
    experiment = c.get_experiment(parent.info.experiment_id).name
    rows = trials(uri, experiment, sweep_id, metric, mode, names)
    return rows, ["run_id", "trial", "status", "evaluations", metric, *names]


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
