"""The `ptv2` commands for prompts: fetch, the registry, inference, export, the MLflow UI and
serving. `launcher/cli.py` registers them on the `ptv2` command next to the job commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from pydantic import ValidationError

from launcher import prompts, serve_access, serve_sources
from ptv2 import tracking
from ptv2.errors import first_line
from ptv2.tracking import TrackingError


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_table(rows: list[dict], cols: list[str]) -> None:
    table = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


UriOpt = typer.Option(
    None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)"
)


def call_or_fail(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (prompts.FetchError, TrackingError, ValueError) as e:
        fail(str(e), code=1)


def fetch(
    source: str = typer.Argument(..., help="RUN_ID, runs:/RUN/PATH, models:/NAME/VERSION or models:/NAME@ALIAS"),
    out: Path = typer.Option(..., "--out", help="folder to write the verified prompt into"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
    tracking_uri: str = UriOpt,
) -> None:
    """Download a prompt, verify every checksum, and place it in --out (nothing half-written)."""
    manifest = call_or_fail(prompts.fetch, tracking_uri, source, out, force)
    p = manifest["prompt"]
    typer.echo(
        f"{out}: verified {p['method']} prompt (length {p['length']}, task {manifest['task']}) "
        f"for {manifest['base_model']['name_or_path']}"
    )


def register(run_id: str, name: str, tracking_uri: str = UriOpt) -> None:
    """Register a run's prompt as a new version of NAME in the MLflow Model Registry."""
    version = call_or_fail(prompts.register, tracking_uri, run_id, name)
    typer.echo(f"models:/{name}/{version}")


def promote(
    name: str,
    version: str,
    alias: str = typer.Option(..., "--alias", help="e.g. production"),
    tracking_uri: str = UriOpt,
) -> None:
    """Point ALIAS of registered prompt NAME at VERSION (then fetch models:/NAME@ALIAS)."""
    call_or_fail(prompts.promote, tracking_uri, name, version, alias)
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
    # transformers and the model code load only for the commands that run a model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the output is JSON lines
    hf_logging.set_verbosity_error()

    from ptv2.artifact import ArtifactError, load_prompt, read_manifest  # (with transformers, above)
    from ptv2.model import load_base_model  # (with transformers, above)

    try:
        manifest = read_manifest(prompt)
        path = model or manifest["base_model"]["name_or_path"]
        base, _ = load_base_model(path, manifest["task"], manifest.get("labels"))
        return load_prompt(prompt, base).eval(), AutoTokenizer.from_pretrained(path)
    except (ArtifactError, OSError, ValueError) as e:
        fail(first_line(e, 2000), code=1)


PromptOpt = typer.Option(..., "--prompt", help="a prompt folder (from training or ptv2 fetch)")
ModelOpt = typer.Option(None, "--model", help="base model path (default: the one in the prompt's manifest)")


def predict(
    texts: list[str] = typer.Argument(None, help="texts to classify (or words to tag, space-separated)"),
    prompt: Path = PromptOpt,
    model: str = ModelOpt,
    file: Path = typer.Option(None, "--file", help="one input per line"),
) -> None:
    """Classify (or tag) texts with a prompt; checks the base model's fingerprint first. JSON lines out."""
    from ptv2.infer import predict as do_predict  # transformers: only for this command

    m, tok = _load(prompt, model)
    for row in do_predict(m, tok, _inputs(texts, file)):
        typer.echo(json.dumps(row))


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
    from ptv2.infer import generate as do_generate  # transformers: only for this command

    m, tok = _load(prompt, model)
    inputs = _inputs(texts, file)
    for text, answer in zip(inputs, do_generate(m, tok, inputs, max_new_tokens=max_new_tokens, raw=raw), strict=True):
        typer.echo(json.dumps({"input": text, "output": answer}))


def export_peft(
    prompt: Path = typer.Argument(..., help="a prompt folder"),
    out: Path = typer.Option(..., "--out", help="where the PEFT adapter folder goes"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Write a PEFT prefix-tuning adapter (PeftModel.from_pretrained loads it) for a causal-LM prompt."""
    from ptv2.artifact import ArtifactError  # transformers: only for this command
    from ptv2.peft_export import export_peft as do_export  # transformers: only for this command

    try:
        path = do_export(prompt, out, overwrite=force)
    except ArtifactError as e:
        fail(str(e), code=1)
    typer.echo(f"{path}: PEFT prefix-tuning adapter")


def ui(
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(5000),
    tracking_uri: str = UriOpt,
) -> None:
    """Serve the MLflow UI over the local store (a lean server: 1 worker, no job runner)."""
    raise typer.Exit(call_or_fail(prompts.serve_ui, tracking_uri, host, port))


# ---- serving: many prompts on one frozen model (launcher/serve.py) -------------------------------
def serve(
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
    max_cache_tokens: int = typer.Option(
        None, help="generation: the most positions the running batch's cache may grow to (default: no bound)"
    ),
    max_prompts: int = typer.Option(64, help="prompts a replica keeps loaded (least recently used out)"),
    max_prompt_mb: float = typer.Option(1024.0, help="bytes of prompts a replica keeps loaded, in MiB"),
    max_new_tokens: int = typer.Option(512, help="the most tokens one generation may ask for"),
    token_file: Path = typer.Option(
        None,
        "--token-file",
        help="require 'Authorization: Bearer TOKEN': the file's first line, or YAML tokens with the prompts each "
        "may use and which may change prompts (README); $PTV2_SERVE_TOKEN: one token",
    ),
    metrics_port: int = typer.Option(
        None, "--metrics-port", help="export Prometheus metrics (Ray's and ptv2's) here (embedded Ray)"
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
    prompts share batches. API: /v1/predict, /v1/generate, /v1/completions and /v1/chat/completions
    (OpenAI, streamed too), /v1/models, /v1/prompts."""
    from launcher import serve as srv  # Ray Serve and FastAPI: loaded by this command only
    from launcher import serve_run  # (as above)

    pairs = [(serve_sources.default_name(x), x) for x in sources or []]
    for item in named or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            fail(f"--prompt {item!r}: expected NAME=SOURCE")
        pairs.append((name, source))
    token = os.environ.get("PTV2_SERVE_TOKEN")
    try:
        tenants = serve_access.read_token_file(token_file) if token_file is not None else None
        if tenants is None and token is not None:
            tenants = serve_access.single(token)
    except serve_access.AccessError as e:
        fail(str(e))
    cache = cache_dir or tracking.home() / "serve-cache"
    try:
        entries = serve_sources.startup_entries(tracking_uri, pairs, cache)
        base = model or (entries[0].base if entries else None)
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
            max_cache_tokens=max_cache_tokens,
            max_prompts=max_prompts,
            max_prompt_bytes=int(max_prompt_mb * (1 << 20)),
            max_new_tokens=max_new_tokens,
            tenants=tenants,
            tracking_uri=tracking.resolve_uri(tracking_uri),
            cache_dir=str(Path(cache).resolve()),
            refresh_s=refresh_s,
        )
    except serve_sources.ServeError as e:
        fail(str(e))
    except ValidationError as e:  # an option out of range, named as on the command line
        fail("; ".join(f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    if not srv.is_loopback(host) and options.tenants is None:
        typer.echo(f"warning: serving on {host} without a token: anyone who reaches it can use it", err=True)
    try:
        code = serve_run.serve_forever(options, entries, ray_address, echo=typer.echo, metrics_port=metrics_port)
    except serve_sources.ServeError as e:
        fail(f"the server did not start: {e}", code=1)
    raise typer.Exit(code)


# the commands registered on `ptv2` (name -> function)
COMMANDS = {
    "fetch": fetch,
    "register": register,
    "promote": promote,
    "predict": predict,
    "generate": generate,
    "export-peft": export_peft,
    "ui": ui,
    "serve": serve,
}
