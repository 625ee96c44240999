"""The `ptv2` command line.

ptv2 validate SPEC            check a job spec (exit 2 and one line naming the field if bad)
ptv2 schema                   JSON Schema of job specs, for editors
ptv2 run SPEC                 train on an embedded local Ray, record the run in MLflow
ptv2 submit SPEC --address    submit to a Ray cluster (Ray Jobs API); status/logs/stop/jobs follow it
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError

from launcher.spec import SpecError, Tracking, json_schema, load_spec
from ptv2 import storage, tracking
from ptv2.errors import first_line

STARTED = time.time()  # when this command began: `ptv2 run`'s "submission"
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


ResumeOpt = typer.Option(None, "--resume", metavar="JOB_ID", help="continue JOB_ID from its newest checkpoint")


@app.command()
def run(spec: Path = SpecArg, resume: str = ResumeOpt) -> None:
    """Train SPEC on an embedded local Ray (workers as in resources) and record it in MLflow."""
    s = _spec(spec)
    if s.sweep is not None:
        fail(f"{spec} has a sweep: section: run it with `ptv2 sweep {spec}`")
    from launcher.runner import JobFailed, JobStopped, run_spec

    try:
        summary = run_spec(s, spec.read_text(), job_id=resume, resume=resume is not None, submitted_at=STARTED)
    except JobFailed as e:
        fail(str(e), code=1)
    except JobStopped:
        fail("stopped (the MLflow run is marked KILLED; continue it with --resume JOB_ID)", code=130)
    typer.echo("")
    typer.echo(f"job:       {summary.job_id}")
    typer.echo(f"run id:    {summary.run_id}")
    typer.echo(f"tracking:  {summary.tracking_uri}")
    typer.echo("metrics:   " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.metrics.items())))
    typer.echo(f"trainable: {summary.trainable}")
    typer.echo(f"storage:   {summary.storage}")
    typer.echo(f"prompt:    {summary.artifact}")
    if summary.tracking_uri.startswith(("http://", "https://")):
        exp = tracking.client(summary.tracking_uri).get_run(summary.run_id).info.experiment_id
        typer.echo(f"MLflow UI: {tracking.ui_link(summary.tracking_uri, exp, summary.run_id)}")
    else:
        typer.echo("MLflow UI: ptv2 ui    (then open the link it prints)")
    typer.echo(f"fetch:     ptv2 fetch {summary.run_id} --out ./prompt")


@app.command()
def sweep(
    spec: Path = SpecArg, resume: str = typer.Option(None, "--resume", metavar="SWEEP_ID", help="continue SWEEP_ID")
) -> None:
    """Run SPEC's sweep: section on Ray Tune (embedded local Ray): trials compared in MLflow,
    early stopping by ASHA, the best trial's prompt tagged (and registered with register_as)."""
    s = _spec(spec)
    if s.sweep is None:
        fail(f"{spec} has no sweep: section (see README, Sweeps)")
    from launcher.runner import JobFailed, JobStopped
    from launcher.sweep import columns, run_sweep

    try:
        summary = run_sweep(s, spec.read_text(), sweep_id=resume, resume=resume is not None)
    except JobFailed as e:
        fail(str(e), code=1)
    except JobStopped:
        fail("stopped (the sweep's MLflow run is marked KILLED; continue it with --resume SWEEP_ID)", code=130)
    typer.echo("")
    typer.echo(f"sweep:     {summary.sweep_id}")
    typer.echo(f"run id:    {summary.run_id} (parent; one nested run per trial)")
    typer.echo(f"best:      {summary.metric} {summary.best_value:.4f} in run {summary.best_run_id}")
    typer.echo("best values: " + ", ".join(f"{k}={v}" for k, v in summary.best_params.items()))
    _table(summary.trials, columns(summary))
    typer.echo(f"trials:    ptv2 runs --sweep {summary.sweep_id}")


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
        fail(f"cannot reach the Ray Jobs API at {address}: {first_line(e)}", code=1)


def package(spec_path: Path, out: Path, overrides: dict | None = None) -> str:
    """Copy the spec and the local data files it names into `out` (the job's working dir) and
    return the spec's name there. Data given as storage URIs and the model are read on the
    cluster. `overrides` (section -> values) are written into the shipped spec."""
    s = load_spec(spec_path, model_on_cluster=True)
    raw = yaml.safe_load(spec_path.read_text())
    (out / "data").mkdir(parents=True)
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(s.data, key)
        if value and not storage.is_uri(value):
            dest = out / "data" / f"{key}{Path(value).suffix}"
            shutil.copy2(value, dest)
            raw["data"][key] = f"data/{dest.name}"
    raw["model"]["name_or_path"] = s.model.name_or_path
    if Path(s.deepspeed.config).is_absolute():
        shutil.copy2(s.deepspeed.config, out / "deepspeed.json")
        raw.setdefault("deepspeed", {})["config"] = "deepspeed.json"
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    (out / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "spec.yaml"


def cluster_ready(s) -> None:
    """Refuse, in one line, what would work on one machine only: a tracking store or a storage
    folder that the cluster's other nodes cannot reach."""
    uri = s.tracking.tracking_uri
    if not uri or not uri.startswith(("http://", "https://", "databricks")):
        fail(
            f"tracking.tracking_uri is {uri or 'not set (the local store)'}: a cluster job logs to an MLflow "
            "server every node reaches; set it in the spec or pass --tracking-uri http://HOST:5000"
        )
    if not s.storage:
        fail(
            "storage is not set: a cluster job keeps checkpoints and prompts where every node reaches them; "
            "set it in the spec or pass --storage s3://BUCKET/PREFIX (or a shared path)"
        )


# Run on the cluster with the job's environment: which Python a job gets there and what it has.
PREFLIGHT = """
import importlib.metadata as md, json, sys
out = {"python": sys.executable, "versions": {}}
for name in ("ptv2", "ray", "torch", "deepspeed", "transformers", "mlflow"):
    try:
        out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["versions"][name] = None
try:
    import launcher.runner, ptv2.train  # noqa
except Exception as e:
    out["import_error"] = f"{type(e).__name__}: {e}"
print("PTV2-PREFLIGHT " + json.dumps(out))
"""
# Must match exactly (ray: client and cluster speak one protocol) or by major.minor.
EXACT, MINOR = ("ptv2", "ray"), ("torch", "deepspeed", "transformers", "mlflow")


def check_cluster_python(client, address: str, env: dict[str, str]) -> None:
    """Refuse, in one line, a cluster whose job Python cannot run ptv2 or has other versions of
    the stack than this machine: the job would fail minutes later with a traceback instead."""
    import shlex
    from importlib import metadata

    probe = client.submit_job(entrypoint=f"python -c {shlex.quote(PREFLIGHT)}", runtime_env={"env_vars": env})
    try:
        for _ in range(240):
            if client.get_job_status(probe).is_terminal():
                break
            time.sleep(0.5)
        logs = client.get_job_logs(probe)
    finally:
        with contextlib.suppress(Exception):
            client.delete_job(probe)
    line = next((x for x in logs.splitlines() if x.startswith("PTV2-PREFLIGHT ")), None)
    fix = "start Ray on every node from the environment where ptv2 is installed (see README, On a Ray cluster)"
    if line is None:
        last = next((x for x in reversed(logs.splitlines()) if x.strip()), "no output")
        fail(f"the cluster at {address} could not run a Python job ({last.strip()[:200]}): {fix}", code=1)
    found = json.loads(line.removeprefix("PTV2-PREFLIGHT "))
    if found.get("import_error") or found["versions"].get("ptv2") is None:
        why = found.get("import_error") or "ptv2 is not installed"
        fail(f"the cluster's Python ({found['python']}) cannot run ptv2 ({why[:200]}): {fix}", code=1)
    for name in (*EXACT, *MINOR):
        with contextlib.suppress(metadata.PackageNotFoundError):
            here, there = metadata.version(name), found["versions"].get(name) or "none"
            same = here == there if name in EXACT else here.split(".")[:2] == there.split(".")[:2]
            if not same:
                fail(
                    f"{name} {there} on the cluster ({found['python']}) but {here} here: {fix}, at the same versions",
                    code=1,
                )


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


@app.command()
def submit(
    spec: Path = SpecArg,
    address: str = AddressOpt,
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow server the job logs to (overrides the spec)"),
    storage_uri: str = typer.Option(
        None,
        "--storage",
        help="where the job keeps checkpoints and prompts: s3://… or a shared path (overrides the spec)",
    ),
    env: list[str] = typer.Option(
        None, "--env", help="KEY=VALUE for the job's processes (repeatable); nothing else is forwarded"
    ),
    resume: str = ResumeOpt,
    wait: bool = typer.Option(False, help="follow the logs until the job ends"),
    preflight: bool = typer.Option(True, help="first check that the cluster's Python runs ptv2 at matching versions"),
) -> None:
    """Submit SPEC to a Ray cluster through the Ray Jobs API (ships the spec and its local data)."""
    from launcher.runner import new_job_id, worker_env

    overrides: dict = {}
    if tracking_uri:
        overrides["tracking"] = {"tracking_uri": tracking_uri}
    if storage_uri:
        try:
            storage.check_uri(storage_uri)
        except storage.StorageError as e:
            fail(f"--storage: {e}")
        overrides["storage"] = storage_uri if storage.is_uri(storage_uri) else os.path.abspath(storage_uri)
    try:
        s = load_spec(spec, model_on_cluster=True)
        # validated like the spec's own fields (a tracking URI with credentials is refused)
        tracking_settings = Tracking.model_validate({**s.tracking.model_dump(), **overrides.get("tracking", {})})
        s = s.model_copy(update={"storage": overrides.get("storage", s.storage), "tracking": tracking_settings})
    except SpecError as e:
        fail(str(e))
    except ValidationError as e:
        fail(f"--tracking-uri: {e.errors()[0]['msg'].removeprefix('Value error, ')}")
    cluster_ready(s)
    client = _client(address)
    if preflight:
        check_cluster_python(client, address, worker_env(s, _env_pairs(env)))
    job_id = resume or new_job_id(s.name)
    submission_id = f"{job_id}-resume-{secrets.token_hex(2)}" if resume else job_id
    with tempfile.TemporaryDirectory(prefix="ptv2-submit-") as tmp:
        name = package(spec, Path(tmp), overrides)
        entrypoint = f"python -m launcher.runner {name} --job-id {job_id} --submitted-at {time.time():.3f}" + (
            " --resume" if resume else ""
        )
        for attempt in range(12):  # a just-started head answers "No available agent" for a while
            try:
                client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"working_dir": tmp, "env_vars": worker_env(s, _env_pairs(env))},
                    metadata={
                        "ptv2": "1",
                        "name": s.name,
                        "job_id": job_id,
                        "tracking_uri": s.tracking.tracking_uri,
                        "experiment": s.tracking.experiment,
                    },
                )
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or attempt == 11:
                    fail(f"the Ray Jobs API at {address} refused the job: {first_line(e)}", code=1)
                time.sleep(5)
    typer.echo(submission_id)
    if wait:
        logs(submission_id, address=address, follow=True)
        status(submission_id, address=address)


@app.command()
def status(job_id: str, address: str = AddressOpt) -> None:
    """A submitted job's state, and from its MLflow run: step and total, latest loss and eval
    metrics, ETA, the run id and where its prompt is (or will be)."""
    info = _job_info(job_id, address)
    typer.echo(f"{job_id}: {info.status}" + (f" — {info.message}" if info.message else ""))
    progress = _progress(info.metadata or {})
    if progress is None:
        return
    p = progress
    if p["total"]:
        eta = f", eta {p['eta_s']:.0f} s" if p["eta_s"] is not None and p["step"] < p["total"] else ""
        loss = f", loss {p['loss']:.4f}" if p["loss"] is not None else ""
        typer.echo(f"  step:     {p['step']}/{p['total']} ({100 * p['step'] / p['total']:.0f}%){loss}{eta}")
    if p["eval"]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(p["eval"].items()))
        typer.echo(f"  eval:     {shown} (step {p['eval_step']})")
    typer.echo(f"  MLflow:   run {p['run_id']} ({p['status']}) at {(info.metadata or {}).get('tracking_uri')}")
    if p["prompt"]:
        typer.echo(f"  prompt:   {p['prompt']}" + ("" if p["prompt_ready"] else " (when it finishes)"))
    if p["error"]:
        typer.echo(f"  error:    {p['error']}")


def _progress(meta: dict) -> dict | None:
    """The job's progress from its MLflow run, or None (not a ptv2 job, or the run is unreachable)."""
    if not meta.get("tracking_uri") or not meta.get("job_id"):
        return None
    try:
        return tracking.job_progress(meta["tracking_uri"], meta.get("experiment", "ptv2"), meta["job_id"])
    except Exception as e:  # the tracking server is down or unreachable from here: say so, don't fail
        typer.echo(f"  (no progress: MLflow at {meta['tracking_uri']} answered {first_line(e, 120)})")
        return None


def _job_info(job_id: str, address: str):
    client = _client(address)
    try:
        return client.get_job_info(job_id)
    except Exception as e:
        fail(f"no job {job_id!r} at {address}: {first_line(e, 200)}", code=1)


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
    """Stop a submitted job; its MLflow run ends as KILLED (resume it with submit --resume)."""
    client = _client(address)
    info = _job_info(job_id, address)
    stopping = client.stop_job(job_id)
    typer.echo(f"{job_id}: {'stopping' if stopping else 'not running'}")
    if not stopping:
        return
    for _ in range(60):  # the driver gets SIGTERM and ends its run itself; make sure it did
        if client.get_job_status(job_id).is_terminal():
            break
        time.sleep(1)
    meta = info.metadata or {}
    if meta.get("tracking_uri") and meta.get("job_id"):
        run_id = tracking.find_job_run(meta["tracking_uri"], meta.get("experiment", "ptv2"), meta["job_id"])
        if run_id and tracking.client(meta["tracking_uri"]).get_run(run_id).info.status == "RUNNING":
            tracking.end_run(meta["tracking_uri"], run_id, "KILLED")
        if run_id:
            typer.echo(f"{job_id}: MLflow run {run_id} KILLED")


@app.command()
def jobs(address: str = AddressOpt) -> None:
    """List the jobs of the Ray cluster."""
    client = _client(address)
    rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    table = []
    for j in rows:
        meta = j.metadata or {}
        p = _progress(meta) if j.status == "RUNNING" or meta.get("ptv2") else None
        step = f"{p['step']}/{p['total']}" if p and p["total"] else ""
        loss = f"{p['loss']:.4f}" if p and p["loss"] is not None else ""
        table.append(
            {
                "job": j.submission_id or j.job_id,
                "state": str(j.status),
                "name": meta.get("name", ""),
                "step": step,
                "loss": loss,
            }
        )
    if not table:
        typer.echo("no jobs")
        return
    _table(table, ["job", "state", "name", "step", "loss"])


# ---- prompts: runs, fetch, registry, inference, UI -----------------------------------------------
UriOpt = typer.Option(
    None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)"
)


def _prompts_call(fn, *args, **kwargs):
    from launcher.prompts import FetchError

    try:
        return fn(*args, **kwargs)
    except (FetchError, ValueError) as e:
        fail(str(e), code=1)


def _table(rows: list[dict], cols: list[str]) -> None:
    table = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


@app.command()
def runs(
    experiment: str = typer.Option(None, "--experiment", "-e", help="only this experiment"),
    sort: str = typer.Option(None, "--sort", help="sort by this metric, e.g. eval/accuracy (highest first)"),
    sweep: str = typer.Option(None, "--sweep", metavar="SWEEP_ID", help="the trials of this sweep, best first"),
    limit: int = typer.Option(50, help="at most this many runs"),
    tracking_uri: str = UriOpt,
) -> None:
    """A table of runs with key params and metrics (or of a sweep's trials)."""
    from launcher.prompts import runs_table, sweep_table

    if sweep:
        rows, cols = _prompts_call(sweep_table, tracking_uri, sweep)
    else:
        rows = _prompts_call(runs_table, tracking_uri, experiment, sort, limit)
        metric_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
        cols = ["run_id", "name", "status", "model", "task", "method", "length", "lr", *metric_keys]
    if not rows:
        typer.echo("no runs")
        return
    _table(rows, cols)


@app.command()
def fetch(
    source: str = typer.Argument(..., help="RUN_ID, runs:/RUN/PATH, models:/NAME/VERSION or models:/NAME@ALIAS"),
    out: Path = typer.Option(..., "--out", help="folder to write the verified prompt into"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
    tracking_uri: str = UriOpt,
) -> None:
    """Download a prompt, verify every checksum, and place it in --out (nothing half-written)."""
    from launcher.prompts import fetch as do_fetch

    manifest = _prompts_call(do_fetch, tracking_uri, source, out, force)
    p = manifest["prompt"]
    typer.echo(
        f"{out}: verified {p['method']} prompt (length {p['length']}, task {manifest['task']}) "
        f"for {manifest['base_model']['name_or_path']}"
    )


@app.command()
def register(run_id: str, name: str, tracking_uri: str = UriOpt) -> None:
    """Register a run's prompt as a new version of NAME in the MLflow Model Registry."""
    from launcher.prompts import register as do_register

    version = _prompts_call(do_register, tracking_uri, run_id, name)
    typer.echo(f"models:/{name}/{version}")


@app.command()
def promote(
    name: str,
    version: str,
    alias: str = typer.Option(..., "--alias", help="e.g. production"),
    tracking_uri: str = UriOpt,
) -> None:
    """Point ALIAS of registered prompt NAME at VERSION (then fetch models:/NAME@ALIAS)."""
    from launcher.prompts import promote as do_promote

    _prompts_call(do_promote, tracking_uri, name, version, alias)
    typer.echo(f"models:/{name}@{alias} -> version {version}")


def _inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    if file is not None:
        if not file.is_file():
            fail(f"--file {file} does not exist")
        lines = file.read_text(encoding="utf-8").splitlines()
    elif texts:
        lines = texts
    else:
        lines = sys.stdin.read().splitlines()
    lines = [x for x in lines if x.strip()]
    if not lines:
        fail("no input text (give TEXT arguments, --file, or lines on stdin)")
    return lines


def _load(prompt: Path, model: str | None):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the output is JSON lines
    hf_logging.set_verbosity_error()

    from ptv2.artifact import ArtifactError, load_prompt, read_manifest
    from ptv2.model import load_base_model

    try:
        manifest = read_manifest(prompt)
        path = model or manifest["base_model"]["name_or_path"]
        base, _ = load_base_model(path, manifest["task"], manifest.get("labels"))
        return load_prompt(prompt, base).eval(), AutoTokenizer.from_pretrained(path)
    except (ArtifactError, OSError, ValueError) as e:
        fail(first_line(e, 2000), code=1)


PromptOpt = typer.Option(..., "--prompt", help="a prompt folder (from training or ptv2 fetch)")
ModelOpt = typer.Option(None, "--model", help="base model path (default: the one in the prompt's manifest)")


@app.command()
def predict(
    texts: list[str] = typer.Argument(None, help="texts to classify (or words to tag, space-separated)"),
    prompt: Path = PromptOpt,
    model: str = ModelOpt,
    file: Path = typer.Option(None, "--file", help="one input per line"),
) -> None:
    """Classify (or tag) texts with a prompt; checks the base model's fingerprint first. JSON lines out."""
    from ptv2.infer import predict as do_predict

    m, tok = _load(prompt, model)
    for row in do_predict(m, tok, _inputs(texts, file)):
        typer.echo(json.dumps(row))


@app.command()
def generate(
    texts: list[str] = typer.Argument(None, help="prompts to continue"),
    prompt: Path = PromptOpt,
    model: str = ModelOpt,
    file: Path = typer.Option(None, "--file", help="one input per line"),
    max_new_tokens: int = typer.Option(48, help="tokens to generate per input"),
    raw: bool = typer.Option(False, "--raw", help="send the texts as they are, without the prompt's stored template"),
) -> None:
    """Continue texts with a causal-LM prompt (greedy), laid out with the template it was trained
    with (unless --raw); checks the base model's fingerprint first."""
    from ptv2.infer import generate as do_generate

    m, tok = _load(prompt, model)
    inputs = _inputs(texts, file)
    for text, answer in zip(inputs, do_generate(m, tok, inputs, max_new_tokens=max_new_tokens, raw=raw), strict=True):
        typer.echo(json.dumps({"input": text, "output": answer}))


@app.command("export-peft")
def export_peft(
    prompt: Path = typer.Argument(..., help="a prompt folder"),
    out: Path = typer.Option(..., "--out", help="where the PEFT adapter folder goes"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Write a PEFT prefix-tuning adapter (PeftModel.from_pretrained loads it) for a causal-LM prompt."""
    from ptv2.artifact import ArtifactError
    from ptv2.peft_export import export_peft as do_export

    try:
        path = do_export(prompt, out, overwrite=force)
    except ArtifactError as e:
        fail(str(e), code=1)
    typer.echo(f"{path}: PEFT prefix-tuning adapter")


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(5000),
    tracking_uri: str = UriOpt,
) -> None:
    """Serve the MLflow UI over the local store (a lean server: 1 worker, no job runner)."""
    from launcher.prompts import serve_ui

    raise typer.Exit(_prompts_call(serve_ui, tracking_uri, host, port))


# ---- serving: many prompts on one frozen model (launcher/serve.py) -------------------------------
@app.command("serve")
def serve_prompts(
    sources: list[str] = typer.Argument(
        None, help="prompts: folders, run ids, runs:/RUN/PATH, models:/NAME/VERSION, models:/NAME@ALIAS"
    ),
    named: list[str] = typer.Option(
        None, "--prompt", help="NAME=SOURCE: a prompt under a name you choose (repeatable)"
    ),
    model: str = typer.Option(None, "--model", help="base model (default: the one the first prompt's manifest names)"),
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(8000),
    replicas: int = typer.Option(1, help="replicas, each with the base model and a bank of prompts"),
    cpus_per_replica: float = typer.Option(None, help="default: every CPU here for one local replica, else 1"),
    gpus_per_replica: float = typer.Option(0.0, help="> 0 serves on CUDA"),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16"),
    max_batch_size: int = typer.Option(16, help="inputs batched into one forward"),
    batch_wait_ms: float = typer.Option(5.0, help="how long a batch waits to fill"),
    max_prompts: int = typer.Option(64, help="prompts a replica keeps loaded (least recently used out)"),
    max_prompt_mb: float = typer.Option(1024.0, help="bytes of prompts a replica keeps loaded, in MiB"),
    max_new_tokens: int = typer.Option(512, help="the most tokens one generation may ask for"),
    token_file: Path = typer.Option(
        None,
        "--token-file",
        help="require 'Authorization: Bearer TOKEN', TOKEN the file's first line ($PTV2_SERVE_TOKEN too)",
    ),
    refresh_s: float = typer.Option(
        30.0, help="re-resolve registry aliases this often (0: on POST /v1/prompts/refresh only)"
    ),
    cache_dir: Path = typer.Option(None, help="where fetched prompts are kept (default $PTV2_HOME/serve-cache)"),
    ray_address: str = typer.Option(
        None, "--address", help="a running Ray cluster (e.g. auto); default: an embedded Ray"
    ),
    tracking_uri: str = UriOpt,
) -> None:
    """Serve many prompts on one frozen base model over HTTP (Ray Serve): requests for different
    prompts share batches. API: /v1/predict, /v1/generate, /v1/completions (OpenAI), /v1/prompts."""
    from launcher import serve as srv
    from launcher import serve_sources

    pairs = [(serve_sources.default_name(x), x) for x in sources or []]
    for item in named or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            fail(f"--prompt {item!r}: expected NAME=SOURCE")
        pairs.append((name, source))
    token = os.environ.get("PTV2_SERVE_TOKEN")
    if token_file is not None:
        if not token_file.is_file():
            fail(f"--token-file {token_file} does not exist")
        token = (token_file.read_text().splitlines() or [""])[0].strip()
    if token is not None and len(token) < 16:
        fail("the bearer token must be at least 16 characters")
    cache = cache_dir or tracking.home() / "serve-cache"
    try:
        entries = serve_sources.startup_entries(tracking_uri, pairs, cache)
        base = model or (entries[0]["base"] if entries else None)
        if base is None:
            fail("nothing to serve: give prompts, or --model to start with none and add them over HTTP")
        options = srv.ServeOptions(
            base=base,
            host=host,
            port=port,
            replicas=replicas,
            cpus_per_replica=cpus_per_replica or ((os.cpu_count() or 1) if replicas == 1 and not ray_address else 1),
            gpus_per_replica=gpus_per_replica,
            dtype=dtype,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            max_prompts=max_prompts,
            max_prompt_bytes=int(max_prompt_mb * (1 << 20)),
            max_new_tokens=max_new_tokens,
            token_sha256=srv.token_digest(token) if token else None,
            tracking_uri=tracking.resolve_uri(tracking_uri),
            cache_dir=str(Path(cache).resolve()),
            refresh_s=refresh_s,
        )
    except serve_sources.ServeError as e:
        fail(str(e))
    except ValidationError as e:  # an option out of range, named as on the command line
        fail("; ".join(f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    if not srv.is_loopback(host) and options.token_sha256 is None:
        typer.echo(f"warning: serving on {host} without a token: anyone who reaches it can use it", err=True)
    try:
        code = srv.serve_forever(options, entries, ray_address, echo=typer.echo)
    except serve_sources.ServeError as e:
        fail(f"the server did not start: {e}", code=1)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
