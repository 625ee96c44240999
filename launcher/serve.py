"""`ptv2 serve`: many prompts on one frozen model, behind Ray Serve.

    HTTP (Serve's proxy; 127.0.0.1 unless told otherwise; bearer tokens, each a tenant's:
          launcher/serve_access.py)
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
/v1/prompts/refresh, POST /v1/predict, POST /v1/generate, POST /v1/completions and
/v1/chat/completions (OpenAI's; `model` names the prompt; `stream` gives Server-Sent Events),
GET /v1/models, GET /v1/stats. The request bodies and JSON errors are in launcher/serve_api.py,
OpenAI's response shapes in launcher/serve_openai.py, the prompt sources and the replica's bank in
launcher/serve_sources.py, the replicas' metrics in launcher/serve_metrics.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (Request, the body models) at runtime through Serve's ingress wrapper, which strings defeat.
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from typing import Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from launcher.prompts import FetchError
from launcher.serve_access import OPEN, Tenant, authenticate
from launcher.serve_api import (
    AddPrompt,
    ChatBody,
    CompletionBody,
    GenerateBody,
    HTTPError,
    PredictBody,
    Sampling,
    app,
    serving_error,
)
from launcher.serve_metrics import ServeMetrics
from launcher.serve_openai import Stream, chat_completion, completion
from launcher.serve_sources import Entry, PromptUnavailable, ReplicaPrompts
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
    tenants: list[Tenant] | None = None  # who may use which prompts (None: no token needed)
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


# Module functions the replicas call are defined before the deployment classes: Serve serializes
# a deployment when it is declared, with the module globals that exist then.
def _sampling(body, raw: bool) -> Sampling:
    """OpenAI's sampling fields (their defaults: temperature 1, top_p 1) as ptv2's."""
    return Sampling(
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        stop=body.stop,
        raw=raw,
    )


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
        self.metrics = ServeMetrics()
        app.state.metrics = self.metrics  # one replica per process: the request counter reads it
        self.prompts = ReplicaPrompts(
            self.bank,
            catalog,
            self.options.tracking_uri,
            self.options.cache_dir,
            self.options.sync_s,
            on_event=self.metrics.bank_event,
        )
        self.scheduler = scheduler(self.base, self.options.max_batch_size, self.options.max_cache_tokens)
        self._follower = asyncio.get_running_loop().create_task(self.metrics.follow(self.scheduler.stats))
        # the prompts the server starts with must all load: a bad one stops the start, by name
        await self.prompts.sync(force=True, strict=True)
        self._refresher = asyncio.get_running_loop().create_task(self.prompts.refresh_every(self.options.refresh_s))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.close()

    async def _prompt(self, name: str, tenant: Tenant, request: Request):
        """The loaded prompt `name` (loaded here if need be); 404 naming the prompts the caller
        may use. A prompt another tenant's is, to this caller, one that does not exist: the same
        answer, after the same catalogue sync."""
        try:
            if not tenant.may_use(name):
                serving.check_name(name)
                await self.prompts.sync(force=True)
                raise serving.UnknownPrompt(name, [])
            prompt = await self.prompts.get(name)
        except serving.UnknownPrompt as e:
            raise serving_error(serving.UnknownPrompt(name, self._visible(tenant))) from e
        except serving.ServingError as e:
            raise serving_error(e) from e
        except PromptUnavailable as e:
            raise HTTPError(503, str(e), "server_error") from e
        request.state.prompt = name  # the metrics' label: a name the server serves
        return prompt

    def _visible(self, tenant: Tenant) -> list[str]:
        return sorted(n for n in self.prompts.entries if tenant.may_use(n))

    # ---- access ---------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> Tenant:
        tenant = authenticate(self.options.tenants, request.headers.get("authorization", ""))
        if tenant is None:
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", "authentication_error")
        return tenant

    def _admin(self, request: Request) -> Tenant:
        tenant = self._auth(request)
        if tenant is OPEN and not is_loopback(self.options.host):
            raise HTTPError(
                403, "changing prompts needs a token when the server listens beyond the loopback", "permission_error"
            )
        if not tenant.admin:
            raise HTTPError(403, "this token may not add, replace or remove prompts", "permission_error")
        return tenant

    # ---- batches ---------------------------------------------------------------------------------------
    def _encode(self, fn, *args, **kwargs):
        try:
            return fn(self.base, *args, **kwargs)
        except serving.ServingError as e:
            raise serving_error(e) from e

    def _check_count(self, n: int) -> None:
        if n > self.options.max_batch_size:
            raise HTTPError(400, f"{n} inputs in one request; this server takes at most {self.options.max_batch_size}")

    def _generate(self, prompt, texts: list[str], body: Sampling, max_new_tokens: int, listeners=None):
        """Encode `texts` (400/413 naming what is wrong) and hand them to the model thread."""
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
        return self.scheduler.generate(rows, listeners)

    async def _generations(self, prompt, texts: list[str], body: Sampling, max_new_tokens: int) -> list:
        request = self._generate(prompt, texts, body, max_new_tokens)
        try:
            out = await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:  # the client went away: its rows leave the batch
            request.cancel()
            raise
        failed = next((i for i, g in enumerate(out) if g.error), None)
        if failed is not None:
            raise HTTPError(500, f"input {failed} could not be continued: {out[failed].error}", "server_error")
        self._measured(prompt.name, request, out)
        return out

    def _measured(self, name: str, request, out: list) -> None:
        """A finished generation request into the metrics: tokens, time to first token, per token."""
        if request.admitted_at is None or request.done_at is None:
            return
        completion_tokens = sum(len(g.token_ids) for g in out)
        self.metrics.generation(
            name,
            sum(g.prompt_tokens for g in out),
            completion_tokens,
            request.time_to_first_token,
            request.done_at - request.admitted_at,
        )

    def _stream(self, prompt, texts: list[str], sampling: Sampling, max_tokens: int, chat: bool, options):
        """A streamed answer (SSE) of OpenAI's chunks; errors before the first byte are JSON."""
        stream = Stream(prompt.name, chat, bool(options and options.include_usage))
        request = self._generate(prompt, texts, sampling, max_tokens, stream.listeners(len(texts)))
        events = stream.events(request, len(texts), lambda out: self._measured(prompt.name, request, out))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        loaded = len(self.bank)
        return {"status": "ok", "base": self.base.name_or_path, "prompts": len(self.prompts.entries), "loaded": loaded}

    @app.get("/v1/prompts")
    async def list_prompts(self, request: Request) -> dict:
        tenant = self._auth(request)
        await self.prompts.sync()
        rows = [row for row in self.prompts.listing() if tenant.may_use(row["name"])]
        return {"base": self.base.name_or_path, "prompts": rows}

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
        prompt = await self._prompt(body.prompt, self._auth(request), request)
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
        prompt = await self._prompt(body.prompt, self._auth(request), request)
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
    async def completions(self, body: CompletionBody, request: Request):
        """OpenAI-compatible completions (`model` names the prompt), streamed with `stream`."""
        tenant = self._auth(request)
        field = body.unsupported()
        if field is not None:
            raise HTTPError(400, f"{field} is not supported by ptv2 serve", param=field)
        prompt = await self._prompt(body.model, tenant, request)
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        sampling = _sampling(body, raw=body.raw)
        if body.stream:
            return self._stream(prompt, texts, sampling, body.max_tokens or 16, False, body.stream_options)
        return completion(prompt.name, await self._generations(prompt, texts, sampling, body.max_tokens or 16))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody, request: Request):
        """OpenAI-compatible chat completions (`model` names a causal-LM prompt), streamed with
        `stream`: the conversation laid out as the prompt was trained (`generation.chat_text`)."""
        tenant = self._auth(request)
        field = body.unsupported()
        if field is not None:
            raise HTTPError(400, f"{field} is not supported by ptv2 serve", param=field)
        prompt = await self._prompt(body.model, tenant, request)
        if not prompt.task.generates:
            raise HTTPError(400, f"prompt {prompt.name!r} is a {prompt.task} prompt; chat needs causal-lm")
        text = self._encode(generation.chat_text, prompt, body.conversation())
        sampling = _sampling(body, raw=True)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(self.options.max_new_tokens, 256)
        if body.stream:
            return self._stream(prompt, [text], sampling, max_tokens, True, body.stream_options)
        return chat_completion(prompt.name, await self._generations(prompt, [text], sampling, max_tokens))

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        tenant = self._auth(request)
        await self.prompts.sync()
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "ptv2"} for name in self._visible(tenant)
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
