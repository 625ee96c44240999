"""The `ptv2` command line.

ptv2 validate SPEC            check a job spec (exit 2 and one line naming the field if bad)
ptv2 inspect SPEC             what the data looks like to the model: lengths, truncation, labels, examples
ptv2 eval PROMPT --data FILE  a saved prompt's metrics on a labelled file, recorded in MLflow
ptv2 schema                   JSON Schema of job specs, for editors
ptv2 run SPEC                 train on an embedded local Ray, record the run in MLflow
ptv2 sweep SPEC               a hyperparameter search (Ray Tune) compared in MLflow
ptv2 submit SPEC --address    submit to a Ray cluster (Ray Jobs API); status/logs/stop/jobs follow it
ptv2 runs                     the runs (or a sweep's trials) as MLflow recorded them

The commands for prompts (fetch, register, promote, predict, generate, export-peft, ui, serve)
are in launcher/cli_prompts.py; the Ray Jobs client behind submit/status/logs/stop/jobs is
launcher/jobs_client.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import typer
from pydantic import ValidationError

from launcher import cli_prompts, evaluation, jobs_client
from launcher.cli_prompts import UriOpt, call_or_fail, fail, print_table
from launcher.prompts import runs_table
from launcher.runner import JobFailed, JobStopped, run_spec, worker_env
from launcher.spec import SpecError, Tracking, json_schema, load_spec
from launcher.sweep import columns, run_sweep, sweep_table
from ptv2 import storage
from ptv2.errors import first_line
from ptv2.tracking import Tracker, ui_link

STARTED = time.time()  # when this command began: `ptv2 run`'s "submission"
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="P-Tuning v2 training service: specs, Ray jobs, prompts."
)
DEFAULT_ADDRESS = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
SpecArg = typer.Argument(..., exists=False, help="path of a YAML job spec (see jobs/)")
AddressOpt = typer.Option(DEFAULT_ADDRESS, "--address", help="Ray dashboard / Jobs API address")
ResumeOpt = typer.Option(None, "--resume", metavar="JOB_ID", help="continue JOB_ID from its newest checkpoint")
ForceOpt = typer.Option(
    False, "--force", help="with --resume: even a job whose run says it is running (its driver gone) or finished"
)


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
def inspect(
    spec: Path = SpecArg,
    as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
    max_rows: int = typer.Option(None, "--max-rows", help="read only each file's first rows (default: all)"),
) -> None:
    """What SPEC's data looks like to the model, before a job is paid for: per split, rows and bad
    rows, labels, token lengths against max_length, truncation, duplicates and two examples as the
    model reads them (the tokens the loss is on in ⟦⟧)."""
    from ptv2.report import format_report, job_report  # transformers: only for this command

    s = _spec(spec)
    try:
        reports = job_report(s.model, s.data, max_rows)
    except (ValueError, OSError) as e:
        fail(first_line(e, 2000), code=1)
    typer.echo(json.dumps([r.to_dict() for r in reports], indent=2) if as_json else format_report(reports))


@app.command("eval")
def eval_prompt(
    prompt: str = typer.Argument(..., help="a prompt folder, RUN_ID, runs:/RUN/PATH, models:/NAME/VERSION or @ALIAS"),
    data: str = typer.Option(..., "--data", help="a labelled jsonl/csv/parquet file: a path or s3://… URI"),
    column: list[str] = typer.Option(
        None, "--column", help="NAME=COLUMN, e.g. text=sentence (default: the training spec's columns)"
    ),
    fmt: str = typer.Option("auto", "--format", help="jsonl, csv or parquet (auto: from the suffix)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    model: str = typer.Option(None, "--model", help="base model path (default: the one in the prompt's manifest)"),
    experiment: str = typer.Option(None, help="MLflow experiment (default: the training run's, else ptv2-eval)"),
    tracking_uri: str = UriOpt,
    address: str = typer.Option(None, "--address", help="run it on this Ray cluster (its Jobs API) instead of here"),
    gpus: float = typer.Option(0, "--gpus", min=0, help="with --address: GPUs for the job"),
    env: list[str] = typer.Option(None, "--env", help="with --address: KEY=VALUE for the job (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON line"),
) -> None:
    """Score a saved prompt on a labelled data file with its task's metrics, laid out as in
    training; recorded in MLflow as an evaluation of that prompt (nested under its training run,
    tagged on a registered version) and printed as a table."""
    try:
        columns = evaluation.parse_columns(column or [])
    except ValueError as e:
        fail(str(e))
    if address:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        problem = evaluation.tracking_reachable_from_cluster(uri) if uri else "--address needs --tracking-uri"
        if problem:
            fail(problem)
        args = ["--tracking-uri", uri, "--format", fmt, "--batch-size", str(batch_size), "--json"]
        args += [x for pair in column or [] for x in ("--column", pair)]
        args += ["--model", model] if model else []
        args += ["--experiment", experiment] if experiment else []
        client = _client(address)
        try:
            job = client.submit_eval(args, data, prompt, {"TRANSFORMERS_VERBOSITY": "error", **_env_pairs(env)}, gpus)
            typer.echo(f"evaluating on the cluster: job {job}", err=True)
            result = json.loads(client.wait_result(job, evaluation.RESULT))
        except jobs_client.ClusterError as e:
            fail(str(e), code=1)
    else:
        from ptv2.errors import ArtifactError  # (transformers: only for this command)
        from ptv2.tracking import TrackingError

        try:
            done = evaluation.evaluate_prompt(
                prompt, data, tracking_uri, columns, fmt, batch_size, model_path=model, experiment=experiment
            )
        except (ValueError, OSError, ArtifactError, TrackingError) as e:
            fail(first_line(e, 2000), code=1)
        result = {"run_id": done.run_id, "examples": done.examples, "metrics": done.metrics}
    if as_json:
        typer.echo(evaluation.RESULT + json.dumps(result))
        return
    print_table([{"metric": k, "value": v} for k, v in result["metrics"].items()], ["metric", "value"])
    typer.echo(f"{result['examples']} examples; MLflow run {result['run_id']}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of job specs (for editor completion and validation)."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(spec: Path = SpecArg, resume: str = ResumeOpt, force: bool = ForceOpt) -> None:
    """Train SPEC on an embedded local Ray (workers as in resources) and record it in MLflow."""
    s = _spec(spec)
    if s.sweep is not None:
        fail(f"{spec} has a sweep: section: run it with `ptv2 sweep {spec}`")
    try:
        summary = run_spec(
            s, spec.read_text(), job_id=resume, resume=resume is not None, submitted_at=STARTED, force=force
        )
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
    tracker = Tracker(summary.tracking_uri)
    if tracker.is_server:
        experiment = tracker.run(summary.run_id).experiment_id
        typer.echo(f"MLflow UI: {ui_link(summary.tracking_uri, experiment, summary.run_id)}")
    else:
        typer.echo("MLflow UI: ptv2 ui    (then open the link it prints)")
    typer.echo(f"fetch:     ptv2 fetch {summary.run_id} --out ./prompt")


@app.command()
def sweep(
    spec: Path = SpecArg,
    resume: str = typer.Option(None, "--resume", metavar="SWEEP_ID", help="continue SWEEP_ID"),
    force: bool = ForceOpt,
) -> None:
    """Run SPEC's sweep: section on Ray Tune (embedded local Ray): trials compared in MLflow,
    early stopping by ASHA, the best trial's prompt tagged (and registered with register_as)."""
    s = _spec(spec)
    if s.sweep is None:
        fail(f"{spec} has no sweep: section (see README, Sweeps)")
    try:
        summary = run_sweep(s, spec.read_text(), sweep_id=resume, resume=resume is not None, force=force)
    except JobFailed as e:
        fail(str(e), code=1)
    except JobStopped:
        fail("stopped (the sweep's MLflow run is marked KILLED; continue it with --resume SWEEP_ID)", code=130)
    typer.echo("")
    typer.echo(f"sweep:     {summary.sweep_id}")
    typer.echo(f"run id:    {summary.run_id} (parent; one nested run per trial)")
    typer.echo(f"best:      {summary.metric} {summary.best_value:.4f} in run {summary.best_run_id}")
    typer.echo("best values: " + ", ".join(f"{k}={v}" for k, v in summary.best_params.items()))
    print_table(summary.trials, columns(summary))
    typer.echo(f"trials:    ptv2 runs --sweep {summary.sweep_id}")


# ---- a Ray cluster, through its Jobs API --------------------------------------------------------
def _client(address: str) -> jobs_client.JobsClient:
    try:
        return jobs_client.JobsClient(address)
    except jobs_client.ClusterError as e:
        fail(str(e), code=1)


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
    force: bool = ForceOpt,
    wait: bool = typer.Option(False, help="follow the logs until the job ends"),
    preflight: bool = typer.Option(True, help="first check that the cluster's Python runs ptv2 at matching versions"),
) -> None:
    """Submit SPEC to a Ray cluster through the Ray Jobs API (ships the spec and its local data)."""
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
    problem = jobs_client.not_cluster_ready(s)
    if problem:
        fail(problem)
    client = _client(address)
    pairs = _env_pairs(env)
    try:
        if preflight:
            client.check_python(worker_env(s, pairs))
        submitted = client.submit(spec, s, overrides, pairs, resume=resume, force=force)
    except (jobs_client.ClusterError, SpecError) as e:
        fail(str(e), code=1)
    typer.echo(submitted.submission_id)
    if wait:
        logs(submitted.submission_id, address=address, follow=True)
        status(submitted.submission_id, address=address)


def _progress(meta: dict):
    """The job's progress from its MLflow run, or None (not a ptv2 job, or MLflow unreachable)."""
    try:
        return jobs_client.progress(meta)
    except Exception as e:  # the tracking server is down or unreachable from here: say so, don't fail
        typer.echo(f"  (no progress: MLflow at {meta['tracking_uri']} answered {first_line(e, 120)})")
        return None


def _info(client: jobs_client.JobsClient, job_id: str):
    try:
        return client.info(job_id)
    except jobs_client.ClusterError as e:
        fail(str(e), code=1)


@app.command()
def status(job_id: str, address: str = AddressOpt) -> None:
    """A submitted job's state, and from its MLflow run: step and total, latest loss and eval
    metrics, ETA, the run id and where its prompt is (or will be)."""
    info = _info(_client(address), job_id)
    typer.echo(f"{job_id}: {info.status}" + (f" — {info.message}" if info.message else ""))
    p = _progress(info.metadata or {})
    if p is None:
        return
    total = p.run.total_steps
    if total:
        eta = f", eta {p.eta_s:.0f} s" if p.eta_s is not None and p.step < total else ""
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        typer.echo(f"  step:     {p.step}/{total} ({100 * p.step / total:.0f}%){loss}{eta}")
    if p.eval:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(p.eval.items()))
        typer.echo(f"  eval:     {shown} (step {p.eval_step})")
    typer.echo(f"  MLflow:   run {p.run.run_id} ({p.run.status}) at {(info.metadata or {}).get('tracking_uri')}")
    if p.prompt:
        typer.echo(f"  prompt:   {p.prompt}" + ("" if p.prompt_ready else " (when it finishes)"))
    if p.run.error:
        typer.echo(f"  error:    {p.run.error}")


@app.command()
def logs(job_id: str, address: str = AddressOpt, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print a submitted job's logs; --follow streams them until the job ends."""
    client = _client(address)
    _info(client, job_id)
    if not follow:
        typer.echo(client.logs(job_id), nl=False)
        return

    async def stream() -> None:
        async for chunk in client.tail(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(stream())


@app.command()
def stop(job_id: str, address: str = AddressOpt) -> None:
    """Stop a submitted job; its MLflow run ends as KILLED (resume it with submit --resume)."""
    client = _client(address)
    _info(client, job_id)
    run_id = client.stop(job_id)
    typer.echo(f"{job_id}: {'stopped' if run_id is not None else 'not running'}")
    if run_id:
        typer.echo(f"{job_id}: MLflow run {run_id} KILLED")


@app.command()
def jobs(address: str = AddressOpt) -> None:
    """List the jobs of the Ray cluster."""
    table = []
    for j in _client(address).list():
        meta = j.metadata or {}
        p = _progress(meta) if j.status == "RUNNING" or meta.get("ptv2") else None
        total = p.run.total_steps if p else None
        table.append(
            {
                "job": j.submission_id or j.job_id,
                "state": str(j.status),
                "name": meta.get("name", ""),
                "step": f"{p.step}/{total}" if total else "",
                "loss": f"{p.loss:.4f}" if p and p.loss is not None else "",
            }
        )
    if not table:
        typer.echo("no jobs")
        return
    print_table(table, ["job", "state", "name", "step", "loss"])


@app.command()
def runs(
    experiment: str = typer.Option(None, "--experiment", "-e", help="only this experiment"),
    sort: str = typer.Option(None, "--sort", help="sort by this metric, e.g. eval/accuracy (highest first)"),
    sweep: str = typer.Option(None, "--sweep", metavar="SWEEP_ID", help="the trials of this sweep, best first"),
    limit: int = typer.Option(50, help="at most this many runs"),
    tracking_uri: str = UriOpt,
) -> None:
    """A table of runs with key params and metrics (or of a sweep's trials)."""
    if sweep:
        rows, cols = call_or_fail(sweep_table, tracking_uri, sweep)
    else:
        rows = call_or_fail(runs_table, tracking_uri, experiment, sort, limit)
        metric_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
        cols = ["run_id", "name", "status", "model", "task", "method", "length", "lr", *metric_keys]
    if not rows:
        typer.echo("no runs")
        return
    print_table(rows, cols)


for _name, _command in cli_prompts.COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
