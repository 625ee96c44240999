"""The `ptv2` command line.

ptv2 validate SPEC            check a job spec (exit 2 and one line naming the field if bad)
ptv2 schema                   JSON Schema of job specs, for editors
ptv2 run SPEC                 train on an embedded local Ray, record the run in MLflow
ptv2 submit SPEC --address    submit to a Ray cluster (Ray Jobs API); status/logs/stop/jobs follow it
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import typer
import yaml

from launcher.spec import SpecError, json_schema, load_spec

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="P-Tuning v2 training service: specs, Ray jobs, prompts."
)
DEFAULT_ADDRESS = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
SpecArg = typer.Argument(..., exists=False, help="path of a YAML job spec (see jobs/)")
AddressOpt = typer.Option(DEFAULT_ADDRESS, "--address", help="Ray dashboard / Jobs API address")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _spec(path: Path):
    try:
        return load_spec(path)
    except SpecError as e:
        fail(str(e))


@app.command()
def validate(spec: Path = SpecArg) -> None:
    """Check a job spec: types, unknown keys, files, model, labels, DeepSpeed config."""
    s = _spec(spec)
    typer.echo(
        f"ok: {spec} — job {s.name!r}, {s.model.task} on {s.model.name_or_path}, "
        f"{s.prompt.method} length {s.prompt.length}, {s.resources.workers} worker(s), "
        f"deepspeed {Path(s.deepspeed.config).name}"
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of job specs (for editor completion and validation)."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(spec: Path = SpecArg) -> None:
    """Train SPEC on an embedded local Ray (workers as in resources) and record it in MLflow."""
    s = _spec(spec)
    from launcher.runner import run_spec

    summary = run_spec(s, spec.read_text())
    typer.echo("")
    typer.echo(f"job:       {summary.job_id}")
    typer.echo(f"run id:    {summary.run_id}")
    typer.echo(f"tracking:  {summary.tracking_uri}")
    typer.echo("metrics:   " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.metrics.items())))
    typer.echo(f"prompt:    {summary.artifact}")
    typer.echo(f"MLflow UI: ptv2 ui    (or: mlflow ui --backend-store-uri {summary.tracking_uri})")
    typer.echo(f"fetch:     ptv2 fetch {summary.run_id} --out ./prompt")


# ---- Ray Jobs API ------------------------------------------------------------------------------
def _auth_headers() -> dict[str, str]:
    """Ray 2.60 clusters use token authentication by default; the token is taken from
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (where `ray start` keeps it)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as e:  # connection refused, 401 without a token, bad URL
        fail(f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0][:300]}", code=1)


def package(spec_path: Path, out: Path) -> str:
    """Copy the spec and the data files it names into `out` (the job's working dir) and return
    the spec's name there. The model is loaded on the cluster from `model.name_or_path`."""
    s = load_spec(spec_path)
    raw = yaml.safe_load(spec_path.read_text())
    (out / "data").mkdir(parents=True)
    for key in ("train_file", "validation_file"):
        value = getattr(s.data, key)
        if value:
            dest = out / "data" / f"{key}{Path(value).suffix}"
            shutil.copy2(value, dest)
            raw["data"][key] = f"data/{dest.name}"
    raw["model"]["name_or_path"] = s.model.name_or_path
    if Path(s.deepspeed.config).is_absolute():
        shutil.copy2(s.deepspeed.config, out / "deepspeed.json")
        raw.setdefault("deepspeed", {})["config"] = "deepspeed.json"
    (out / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "spec.yaml"


@app.command()
def submit(
    spec: Path = SpecArg,
    address: str = AddressOpt,
    wait: bool = typer.Option(False, help="follow the logs until the job ends"),
) -> None:
    """Submit SPEC to a Ray cluster through the Ray Jobs API (ships the spec and its data)."""
    s = _spec(spec)
    from launcher.runner import new_job_id, worker_env

    client = _client(address)
    job_id = new_job_id(s.name)
    with tempfile.TemporaryDirectory(prefix="ptv2-submit-") as tmp:
        name = package(spec, Path(tmp))
        env = worker_env(s)
        client.submit_job(
            entrypoint=f"python -m launcher.runner {name} --job-id {job_id}",
            submission_id=job_id,
            runtime_env={"working_dir": tmp, "env_vars": env},
            metadata={"ptv2": "1", "name": s.name},
        )
    typer.echo(job_id)
    if wait:
        logs(job_id, address=address, follow=True)
        status(job_id, address=address)


@app.command()
def status(job_id: str, address: str = AddressOpt) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    info = _job_info(job_id, address)
    typer.echo(f"{job_id}: {info.status}" + (f" — {info.message}" if info.message else ""))


def _job_info(job_id: str, address: str):
    client = _client(address)
    try:
        return client.get_job_info(job_id)
    except Exception as e:
        fail(f"no job {job_id!r} at {address}: {str(e).splitlines()[0][:200]}", code=1)


@app.command()
def logs(job_id: str, address: str = AddressOpt, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print a submitted job's logs; --follow streams them until the job ends."""
    client = _client(address)
    _job_info(job_id, address)
    if not follow:
        typer.echo(client.get_job_logs(job_id), nl=False)
        return

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(stream())


@app.command()
def stop(job_id: str, address: str = AddressOpt) -> None:
    """Stop a submitted job."""
    client = _client(address)
    _job_info(job_id, address)
    typer.echo(f"{job_id}: {'stopping' if client.stop_job(job_id) else 'not running'}")


@app.command()
def jobs(address: str = AddressOpt) -> None:
    """List the jobs of the Ray cluster."""
    client = _client(address)
    rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    for j in rows:
        name = (j.metadata or {}).get("name", "")
        typer.echo(f"{j.submission_id or j.job_id}\t{j.status}\t{name}")
    if not rows:
        typer.echo("no jobs")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
