"""`ptv2 serve`: many prompts on one frozen model, behind Ray Serve.

    HTTP (Serve's proxy; 127.0.0.1 unless told otherwise; optional bearer token)
      └─ PromptServer replicas (FastAPI ingress): one frozen base + a PromptBank each, and one
         model thread (`ptv2.scheduler`) that batches every request's rows, whatever their
         prompts, into ONE forward: predictions per turn, generations by continuous batching.
      └─ PromptCatalog (one replica): which prompts the application serves, each pinned to a
         run artifact (or a folder); replicas reconcile their banks with it
         (`launcher.serve_sources.ReplicaPrompts`).

Prompts come from folders, run ids, `runs:/RUN/PATH`, `models:/NAME/VERSION` and
`models:/NAME@ALIAS`; registry and run prompts are fetched (every checksum verified) into a local
cache, and every prompt is verified against the loaded base (fingerprint) before it serves.
Aliases are re-resolved every `refresh_s` and on `POST /v1/prompts/refresh`: a new version is
verified on the replica that finds it before the catalog (and so every replica) switches to it.

API (JSON; every error is {"error": {"message", "type", "code"}} with a 4xx for the caller's
mistakes): GET /health, GET /v1/prompts, POST /v1/prompts, DELETE /v1/prompts/NAME, POST
/v1/prompts/refresh, POST /v1/predict, POST /v1/generate, POST /v1/completions (OpenAI; `model`
names the prompt), GET /v1/models, GET /v1/stats. The request bodies and JSON errors are in
launcher/serve_api.py, the prompt sources and the replica's bank in launcher/serve_sources.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (Request, the body models) at runtime through Serve's ingress wrapper, which strings defeat.
import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import signal
import threading
import time
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from launcher.prompts import FetchError
from launcher.serve_api import (
    AddPrompt,
    CompletionBody,
    GenerateBody,
    HTTPError,
    PredictBody,
    Sampling,
    app,
    serving_error,
)
from launcher.serve_sources import Entry, PromptUnavailable, ReplicaPrompts, ServeError
from ptv2 import generation, serving
from ptv2.artifact import ArtifactError
from ptv2.scheduler import Scheduler

logger = logging.getLogger("ptv2.serve")
APP_NAME = "ptv2"


class ServeOptions(BaseModel):
    """What one `ptv2 serve` application runs with (the CLI fills it; replicas receive it)."""

    model_config = ConfigDict(extra="forbid")

    base: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(16, ge=1, le=1024)  # rows per forward, and rows decoding at once
    max_cache_tokens: int | None = Field(None, ge=1)  # generation: positions the cache may grow to, all rows
    max_prompts: int = Field(64, ge=1)
    max_prompt_bytes: int = Field(1 << 30, ge=1)
    max_input_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    token_sha256: str | None = None
    tracking_uri: str | None = None
    cache_dir: str
    refresh_s: float = Field(30.0, ge=0)  # 0: aliases move only on POST /v1/prompts/refresh
    sync_s: float = Field(2.0, ge=0)
    trust_remote_code: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def token_digest(token: str) -> str:
    """Replicas keep the token's sha256 only (their arguments are visible to the cluster)."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


# ---- the catalogue ---------------------------------------------------------------------------------------
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class PromptCatalog:
    """Which prompts the application serves (`serve_sources.Entry` by name). Replicas add and move
    entries (after verifying them) and reconcile their banks with it."""

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = {e.name: e for e in entries}

    async def entries(self) -> list[Entry]:
        return list(self._entries.values())

    async def put(self, entry: Entry, expect: str | None = None) -> bool:
        """Add or replace; with `expect`, only if the entry is still pinned to it (a replica that
        verified version N+1 must not overwrite one that already moved on)."""
        old = self._entries.get(entry.name)
        if expect is not None and (old is None or old.pinned != expect):
            return False
        self._entries[entry.name] = entry
        return True

    async def remove(self, name: str) -> bool:
        return self._entries.pop(name, None) is not None


# ---- the replicas -------------------------------------------------------------------------------------------
@serve.deployment
@serve.ingress(app)
class PromptServer:
    """One frozen base model with its bank of prompts; batches mix prompts. `scheduler`: the
    model thread's class (`ptv2.scheduler.Scheduler`; benchmarks pass their baselines)."""

    async def __init__(self, options: dict, catalog, scheduler=Scheduler) -> None:
        import torch

        self.options = ServeOptions(**options)
        if self.options.device == "cpu":
            torch.set_num_threads(max(1, int(self.options.cpus_per_replica)))
        app.state.max_body_bytes = self.options.max_body_bytes
        self.base = await asyncio.to_thread(
            serving.ServedBase.load,
            self.options.base,
            self.options.torch_dtype(),
            self.options.device,
            self.options.trust_remote_code,
        )
        self.bank = serving.PromptBank(self.base, self.options.max_prompts, self.options.max_prompt_bytes)
        self.prompts = ReplicaPrompts(
            self.bank, catalog, self.options.tracking_uri, self.options.cache_dir, self.options.sync_s
        )
        self.scheduler = scheduler(self.base, self.options.max_batch_size, self.options.max_cache_tokens)
        # the prompts the server starts with must all load: a bad one stops the start, by name
        await self.prompts.sync(force=True, strict=True)
        self._refresher = asyncio.get_running_loop().create_task(self.prompts.refresh_every(self.options.refresh_s))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.close()

    async def _prompt(self, name: str):
        """The loaded prompt `name` (loaded here if need be); 404 naming the prompts served."""
        try:
            return await self.prompts.get(name)
        except serving.ServingError as e:
            raise serving_error(e) from e
        except PromptUnavailable as e:
            raise HTTPError(503, str(e), "server_error") from e

    # ---- access ---------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.options.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token_digest(token.strip()), self.options.token_sha256
        ):
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", "authentication_error")

    def _admin(self, request: Request) -> None:
        self._auth(request)
        if self.options.token_sha256 is None and not is_loopback(self.options.host):
            raise HTTPError(
                403, "changing prompts needs a token when the server listens beyond the loopback", "permission_error"
            )

    # ---- batches ---------------------------------------------------------------------------------------
    def _encode(self, fn, *args, **kwargs):
        try:
            return fn(self.base, *args, **kwargs)
        except serving.ServingError as e:
            raise serving_error(e) from e

    def _check_count(self, n: int) -> None:
        if n > self.options.max_batch_size:
            raise HTTPError(400, f"{n} inputs in one request; this server takes at most {self.options.max_batch_size}")

    async def _generations(self, prompt, texts: list[str], body: Sampling, max_new_tokens: int) -> list:
        self._check_count(len(texts))
        if max_new_tokens > self.options.max_new_tokens:
            raise HTTPError(
                400, f"at most {self.options.max_new_tokens} new tokens per request, {max_new_tokens} asked"
            )
        rows = [
            self._encode(
                generation.encode_generate,
                prompt,
                text,
                max_new_tokens=max_new_tokens,
                raw=body.raw,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=getattr(body, "top_k", 0),
                seed=body.seed,
                stop=body.stops(),
                max_input_tokens=self.options.max_input_tokens,
            )
            for text in texts
        ]
        request = self.scheduler.generate(rows)
        try:
            out = await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:  # the client went away: its rows leave the batch
            request.cancel()
            raise
        failed = next((i for i, g in enumerate(out) if g.error), None)
        if failed is not None:
            raise HTTPError(500, f"input {failed} could not be continued: {out[failed].error}", "server_error")
        return out

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        loaded = len(self.bank)
        return {"status": "ok", "base": self.base.name_or_path, "prompts": len(self.prompts.entries), "loaded": loaded}

    @app.get("/v1/prompts")
    async def list_prompts(self, request: Request) -> dict:
        self._auth(request)
        await self.prompts.sync()
        return {"base": self.base.name_or_path, "prompts": self.prompts.listing()}

    @app.post("/v1/prompts", status_code=201)
    async def add_prompt(self, body: AddPrompt, request: Request) -> dict:
        """Add (or replace) a prompt: verified here before any replica serves it."""
        self._admin(request)
        try:
            serving.check_name(body.name)
        except serving.ServingError as e:
            raise serving_error(e) from e
        try:
            entry = await self.prompts.pin(body.name, body.source)
        except FetchError as e:
            raise HTTPError(404, str(e), "not_found_error") from e
        try:
            prompt = await self.prompts.add(entry)
        except (ArtifactError, FetchError, serving.ServingError) as e:
            raise HTTPError(422, str(e)) from e
        return {"name": body.name, "version": entry.version, **prompt.describe(), "source": body.source}

    @app.delete("/v1/prompts/{name}")
    async def remove_prompt(self, name: str, request: Request) -> dict:
        self._admin(request)
        if not await self.prompts.remove(name):
            raise HTTPError(
                404, f"no prompt {name!r} is served", "not_found_error", prompts=sorted(self.prompts.entries)
            )
        return {"removed": name}

    @app.post("/v1/prompts/refresh")
    async def refresh(self, request: Request) -> dict:
        """Re-resolve registry aliases now (they are also re-resolved every refresh_s)."""
        self._admin(request)
        return {"changes": await self.prompts.refresh()}

    @app.get("/v1/stats")
    async def batch_stats(self, request: Request) -> dict:
        self._auth(request)
        return dataclasses.asdict(self.scheduler.stats)

    @app.post("/v1/predict")
    async def predict(self, body: PredictBody, request: Request) -> dict:
        """Classify texts (seq-cls) or tag words (token-cls) with a prompt."""
        self._auth(request)
        prompt = await self._prompt(body.prompt)
        items = body.items()
        self._check_count(len(items))
        rows = [
            self._encode(serving.encode_predict, prompt, x, body.truncate, self.options.max_input_tokens) for x in items
        ]
        results = await asyncio.wrap_future(self.scheduler.predict(rows))
        return {"prompt": prompt.name, "task": prompt.task.name, "results": results}

    @app.post("/v1/generate")
    async def generate(self, body: GenerateBody, request: Request) -> dict:
        """Continue texts with a causal-LM prompt (greedy unless temperature > 0)."""
        self._auth(request)
        prompt = await self._prompt(body.prompt)
        out = await self._generations(prompt, body.items(), body, body.max_new_tokens)
        results = [
            {
                "output": g.text,
                "finish_reason": g.finish_reason,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": len(g.token_ids),
            }
            for g in out
        ]
        return {"prompt": prompt.name, "results": results}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: Request) -> dict:
        """OpenAI-compatible completions: `model` names the prompt."""
        self._auth(request)
        field = body.unsupported()
        if field is not None:
            raise HTTPError(400, f"{field} is not supported by ptv2 serve", param=field)
        prompt = await self._prompt(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        sampling = Sampling(
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed,
            stop=body.stop,
            raw=body.raw,
        )
        out = await self._generations(prompt, texts, sampling, body.max_tokens or 16)
        used = sum(g.prompt_tokens for g in out), sum(len(g.token_ids) for g in out)
        return {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": prompt.name,
            "choices": [
                {"text": g.text, "index": i, "logprobs": None, "finish_reason": g.finish_reason}
                for i, g in enumerate(out)
            ],
            "usage": {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)},
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        await self.prompts.sync()
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "ptv2"}
                for name in sorted(self.prompts.entries)
            ],
        }


# ---- running it ---------------------------------------------------------------------------------------------
def build_app(options: ServeOptions, entries: list[Entry], scheduler=Scheduler):
    """The Serve application: the catalogue (holding `entries`) and the replicas (`scheduler`:
    their model thread's class)."""
    catalog = PromptCatalog.bind([dataclasses.replace(e, base=None) for e in entries])
    actor = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor["num_gpus"] = options.gpus_per_replica
    server = PromptServer.options(
        num_replicas=options.replicas,
        # room for a full predict batch, a full generate batch and the next ones queueing
        max_ongoing_requests=8 * options.max_batch_size,
        ray_actor_options=actor,
        max_constructor_retry_count=1,  # a prompt that does not verify will not verify on a retry
        health_check_period_s=10,
    )
    return server.bind(options.model_dump(), catalog, scheduler)


def start(
    options: ServeOptions,
    entries: list[Entry],
    address: str | None = None,
    num_cpus: int | None = None,
    scheduler=Scheduler,
):
    """Start Ray (embedded unless `address`) and Serve, deploy, and return the app's handle;
    raises ServeError with the replica's reason when the application does not start."""
    import ray

    if address is None:
        _check_port(options.host, options.port)
    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, configure_logging=False)
        else:
            cpus = num_cpus or max(os.cpu_count() or 1, int(options.replicas * options.cpus_per_replica))
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
        started_ray = True
    serve.start(http_options={"host": options.host, "port": options.port})
    host, port = http_bind()
    if (host, port) != (options.host, options.port):
        # Serve keeps the HTTP options it started with (Ray only logs a warning): the replicas'
        # admin check and the token warning would trust a host that is not the real one
        stop(started_ray, address)
        raise ServeError(
            f"Ray Serve already runs on this cluster, listening on {host}:{port}, and cannot move while it runs: "
            f"serve with --host {host} --port {port}, or shut that Serve down first (serve shutdown)"
        )
    try:
        return serve.run(build_app(options, entries, scheduler), name=APP_NAME, route_prefix="/")
    except Exception as e:
        detail = str(e)
        with contextlib.suppress(Exception):  # the replica's own exception is in the app's status
            status = serve.status().applications[APP_NAME]
            detail += "\n".join(["", status.message, *(d.message for d in status.deployments.values())])
        stop(started_ray, address)
        raise ServeError(_reason(detail)) from e


def http_bind() -> tuple[str, int]:
    """(host, port) the running Serve's HTTP proxies listen on. Ray 2.60 has no public call for
    it: its controller client holds the options the proxies started with (a stable schema)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return details.http_options.host, details.http_options.port


def _check_port(host: str, port: int) -> None:
    """Refuse a port something else holds now (Serve's proxy would only log its failure)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from e


def _reason(text: str) -> str:
    """The line of a failed deployment that says why (the replica's own exception)."""
    found = re.findall(r"(?:ArtifactError|FetchError|ServeError|UnsupportedModelError|OSError|ValueError): (.+)", text)
    return found[-1].strip() if found else text.strip().splitlines()[-1][:2000]


def stop(shutdown_ray: bool, address: str | None) -> None:
    """Take down what `start` brought up: the whole embedded Ray, or only this app on a cluster."""
    import ray

    with contextlib.suppress(Exception):
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    if shutdown_ray and ray.is_initialized():
        ray.shutdown()


def serve_forever(options: ServeOptions, entries: list[Entry], address: str | None = None, echo=print) -> int:
    """Run until SIGINT/SIGTERM, then take down what was started; returns the exit status."""
    import ray

    started_ray = not ray.is_initialized()
    done = threading.Event()
    previous = {}
    try:
        start(options, entries, address)
        # after ray.init, which installs handlers of its own: ours end the wait, then clean up
        previous = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        url = f"http://{options.host}:{options.port}"
        echo(f"serving {len(entries)} prompt(s) on {options.base} at {url}  (Ctrl-C stops)")
        for e in entries:
            echo(f"  {e.name:<24} {e.source}" + (f"  (version {e.version})" if e.version else ""))
        echo(f"try: curl {url}/v1/prompts")
        while not done.wait(1.0):
            pass
        return 0
    finally:
        echo("stopping")
        stop(started_ray, address)
        for s, handler in previous.items():
            signal.signal(s, handler)
