"""`ptv2 serve`: many prompts on one frozen model, behind Ray Serve.

    HTTP (Serve's proxy; 127.0.0.1 unless told otherwise; optional bearer token)
      └─ PromptServer replicas (FastAPI ingress): one frozen base + a PromptBank each. Concurrent
         requests, whatever their prompts, are collected by @serve.batch into ONE forward of the
         frozen model (ptv2.serving); predictions and generations batch separately.
      └─ PromptCatalog (one replica): which prompts the application serves, each pinned to a
         run artifact (or a folder); replicas reconcile their banks with it.

Prompts come from folders, run ids, `runs:/RUN/PATH`, `models:/NAME/VERSION` and
`models:/NAME@ALIAS`; registry and run prompts are fetched (every checksum verified) into a local
cache, and every prompt is verified against the loaded base (fingerprint) before it serves.
Aliases are re-resolved every `refresh_s` and on `POST /v1/prompts/refresh`: a new version is
verified on the replica that finds it before the catalog (and so every replica) switches to it.

API (JSON; every error is {"error": {"message", "type", "code"}} with a 4xx for the caller's
mistakes): GET /health, GET /v1/prompts, POST /v1/prompts, DELETE /v1/prompts/NAME, POST
/v1/prompts/refresh, POST /v1/predict, POST /v1/generate, POST /v1/completions (OpenAI; `model`
names the prompt), GET /v1/models, GET /v1/stats. The request bodies and JSON errors are in
launcher/serve_api.py, the prompt sources in launcher/serve_sources.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (Request, the body models) at runtime through Serve's ingress wrapper, which strings defeat.
import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections import defaultdict, deque
from functools import partial
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
from launcher.serve_sources import ServeError, is_alias, materialize, pin
from ptv2.artifact import ArtifactError

logger = logging.getLogger("ptv2.serve")
APP_NAME = "ptv2"
BATCHES_IN_FLIGHT = 8  # per replica and kind: batches Ray hands over while the model computes


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
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
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
    batching: Literal["mixed", "per-prompt"] = "mixed"  # per-prompt: the baseline of benchmarks/serve_bench.py
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
    """Which prompts the application serves: name -> {"source", "pinned", "version"}. Replicas
    add and move entries (after verifying them) and reconcile their banks with it."""

    def __init__(self, entries: list[dict]) -> None:
        self._entries = {e["name"]: dict(e) for e in entries}

    async def entries(self) -> list[dict]:
        return [dict(e) for e in self._entries.values()]

    async def put(self, entry: dict, expect: str | None = None) -> bool:
        """Add or replace; with `expect`, only if the entry is still pinned to it (a replica that
        verified version N+1 must not overwrite one that already moved on)."""
        old = self._entries.get(entry["name"])
        if expect is not None and (old is None or old["pinned"] != expect):
            return False
        self._entries[entry["name"]] = dict(entry)
        return True

    async def remove(self, name: str) -> bool:
        return self._entries.pop(name, None) is not None


class LoadFailures:
    """Prompt versions that did not load on this replica, retried with backoff: a fetch can fail
    for a moment (the tracking server restarting, the network), and a replica that never tried
    again would serve the old version while the others serve the new one."""

    FIRST_S, MAX_S = 5.0, 300.0

    def __init__(self) -> None:
        self._failed: dict[str, dict] = {}  # name -> {"pinned", "version", "error", "at", "attempts"}

    def record(self, name: str, entry: dict, error: str, now: float) -> None:
        same = self._failed.get(name, {}).get("pinned") == entry["pinned"]
        attempts = self._failed[name]["attempts"] + 1 if same else 1
        self._failed[name] = {
            "pinned": entry["pinned"],
            "version": entry.get("version"),
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


def _count_rows(jobs: list[list]) -> int:
    return sum(len(job) for job in jobs)


def _split(flat: list, jobs: list[list]) -> list[list]:
    out, i = [], 0
    for job in jobs:
        out.append(flat[i : i + len(job)])
        i += len(job)
    return out


class ModelQueue:
    """Rows wait here for the model; each run takes every row waiting (whole requests, up to
    `max_rows`), so batches fill while the previous one computes.

    @serve.batch forms a batch as soon as its wait ends, also while the model is still busy with
    the one before (Ray's batch queue takes the next batch, then waits for its concurrency permit):
    under load it hands over many small batches, one or two requests each (benchmarks/SERVING.md).
    Its batches are merged here before each forward."""

    def __init__(self, run, max_rows: int) -> None:
        self.run, self.max_rows = run, max_rows
        self._jobs: deque[tuple[list, asyncio.Future]] = deque()
        self._ready: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, rows: list) -> list:
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._ready = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._jobs.append((rows, future))
        self._ready.set()
        return await future

    def _take(self) -> list[tuple[list, asyncio.Future]]:
        jobs, n = [], 0
        while self._jobs and (not jobs or n + len(self._jobs[0][0]) <= self.max_rows):
            rows, future = self._jobs.popleft()
            if not future.cancelled():
                jobs.append((rows, future))
                n += len(rows)
        if not self._jobs:
            self._ready.clear()
        return jobs

    async def _serve(self) -> None:
        while True:
            await self._ready.wait()
            jobs = self._take()
            if not jobs:
                continue
            flat = [row for rows, _ in jobs for row in rows]
            try:
                results = await asyncio.to_thread(self.run, flat)
            except Exception:  # one request's rows must not fail the others': each runs alone
                for rows, future in jobs:
                    try:
                        part = await asyncio.to_thread(self.run, rows)
                    except Exception as e:
                        if not future.done():
                            future.set_exception(e)
                        continue
                    if not future.done():
                        future.set_result(part)
                continue
            for (_, future), part in zip(jobs, _split(results, [rows for rows, _ in jobs]), strict=True):
                if not future.done():
                    future.set_result(part)


# ---- the replicas -------------------------------------------------------------------------------------------
@serve.deployment
@serve.ingress(app)
class PromptServer:
    """One frozen base model with its bank of prompts; batches mix prompts."""

    async def __init__(self, options: dict, catalog) -> None:
        import torch

        from ptv2 import serving as sv

        self.o = ServeOptions(**options)
        if self.o.device == "cpu":
            torch.set_num_threads(max(1, int(self.o.cpus_per_replica)))
        app.state.max_body_bytes = self.o.max_body_bytes
        self.base = await asyncio.to_thread(
            sv.ServedBase.load,
            self.o.base,
            self.o.torch_dtype(),
            self.o.device,
            self.o.trust_remote_code,
        )
        self.bank = sv.PromptBank(self.base, self.o.max_prompts, self.o.max_prompt_bytes)
        self.catalog = catalog
        self.entries: dict[str, dict] = {}
        self.failures = LoadFailures()  # prompt versions that did not load here, retried with backoff
        self.stats = {"predict": defaultdict(int), "generate": defaultdict(int)}
        self._loading: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._sync_lock = asyncio.Lock()
        self._synced = 0.0
        wait = self.o.batch_wait_ms / 1000
        for method in (self._predict_batch, self._generate_batch):
            method.set_max_batch_size(self.o.max_batch_size)
            method.set_batch_wait_timeout_s(wait)
        self.queues = {
            "predict": ModelQueue(partial(self._run, "predict"), self.o.max_batch_size),
            "generate": ModelQueue(partial(self._run, "generate"), self.o.max_batch_size),
        }
        # the prompts the server starts with must all load: a bad one stops the start, by name
        await self._sync(force=True, strict=True)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    # ---- prompts -------------------------------------------------------------------------------------
    async def _sync(self, force: bool = False, strict: bool = False) -> None:
        """Reconcile the bank with the catalogue (at most every sync_s unless forced): entries
        removed leave, entries re-pinned are reloaded (the old one serves until the new one is
        verified; a version that failed is tried again after a backoff)."""
        if not force and time.monotonic() - self._synced < self.o.sync_s:
            return
        async with self._sync_lock:
            self.entries = {e["name"]: e for e in await self.catalog.entries.remote()}
            self._synced = time.monotonic()
            for name in self.bank.names():
                if name not in self.entries:
                    self.bank.remove(name)
            for name, entry in self.entries.items():
                loaded = self.bank.peek(name)
                stale = loaded is not None and loaded.source != entry["pinned"]
                if strict or (stale and self.failures.may_try(name, entry["pinned"], time.monotonic())):
                    try:
                        await self._load(entry)
                    except Exception as e:
                        if strict:
                            raise
                        logger.warning(
                            "prompt %s: %s stays; %s did not load: %s", name, loaded.source, entry["pinned"], e
                        )

    async def _load(self, entry: dict):
        """Fetch (if need be), verify and load `entry` into the bank."""
        name = entry["name"]
        async with self._loading[name]:
            loaded = self.bank.peek(name)
            if loaded is not None and loaded.source == entry["pinned"]:
                return loaded
            try:
                path = await asyncio.to_thread(materialize, self.o.tracking_uri, entry["pinned"], self.o.cache_dir)
                prompt, evicted = await asyncio.to_thread(self.bank.load, name, path, entry["pinned"])
            except Exception as e:
                self.failures.record(name, entry, str(e), time.monotonic())
                raise
            self.failures.clear(name)
            if evicted:
                logger.info("prompt %s loaded; evicted (least recently used): %s", name, ", ".join(evicted))
            return prompt

    async def _prompt(self, name: str):
        """The loaded prompt `name`, loading it if the catalogue has it (evicted, or added on
        another replica); 404 naming the prompts served otherwise."""
        from ptv2 import serving as sv

        try:
            sv.check_name(name)
            await self._sync()
            with contextlib.suppress(sv.UnknownPrompt):
                return self.bank.get(name)
            if name not in self.entries:
                await self._sync(force=True)
            if name not in self.entries:
                raise sv.UnknownPrompt(name, list(self.entries))
        except sv.ServingError as e:
            raise serving_error(e) from e
        try:
            return await self._load(self.entries[name])
        except (ArtifactError, FetchError, OSError) as e:
            raise HTTPError(503, f"prompt {name!r} is served but could not be loaded: {e}", "server_error") from e

    async def _refresh(self) -> list[dict]:
        """Re-resolve every alias; a moved one is verified here first, then the catalogue moves."""
        await self._sync(force=True)
        changes = []
        for entry in list(self.entries.values()):
            if not is_alias(entry["source"]):
                continue
            try:
                now = await asyncio.to_thread(pin, self.o.tracking_uri, entry["source"])
            except FetchError as e:
                changes.append({"name": entry["name"], "error": str(e)})
                continue
            if now["pinned"] == entry["pinned"]:
                continue
            moved = {**entry, **now}
            if not self.failures.may_try(entry["name"], moved["pinned"], time.monotonic()):
                continue  # refused a moment ago: reported in GET /v1/prompts, tried again later
            try:
                await self._load(moved)
            except Exception as e:
                changes.append({"name": entry["name"], "version": moved["version"], "error": str(e)})
                continue
            if await self.catalog.put.remote(moved, entry["pinned"]):
                changes.append({"name": entry["name"], "from": entry["version"], "to": moved["version"]})
            self.entries[entry["name"]] = moved
        return changes

    async def _refresh_loop(self) -> None:
        while self.o.refresh_s > 0:
            await asyncio.sleep(self.o.refresh_s)
            try:
                for change in await self._refresh():
                    logger.info("alias refresh: %s", change)
            except Exception:
                logger.exception("alias refresh failed")

    # ---- access ---------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.o.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token_digest(token.strip()), self.o.token_sha256):
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", "authentication_error")

    def _admin(self, request: Request) -> None:
        self._auth(request)
        if self.o.token_sha256 is None and not is_loopback(self.o.host):
            raise HTTPError(
                403, "changing prompts needs a token when the server listens beyond the loopback", "permission_error"
            )

    # ---- batches ---------------------------------------------------------------------------------------
    def _run(self, kind: str, rows: list) -> list:
        """One forward batch (predict) or one generation batch over `rows`, all prompts mixed,
        or (the baseline) one batch per prompt in turn."""
        from ptv2 import serving as sv

        self._count(kind, rows)
        fn = sv.predict if kind == "predict" else sv.generate
        if self.o.batching == "mixed":
            return fn(self.base, rows)
        out: list = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(r.prompt), []).append(i)
        for idx in groups.values():
            for i, result in zip(idx, fn(self.base, [rows[i] for i in idx]), strict=True):
                out[i] = result
        return out

    def _count(self, kind: str, rows: list) -> None:
        s = self.stats[kind]
        s["batches"] += 1
        s["rows"] += len(rows)
        s["prompts"] += len({id(r.prompt) for r in rows})
        s["largest"] = max(s["largest"], len(rows))

    # Ray may hand over the next batches while the model is busy (max_concurrent_batches): they
    # meet in the model's queue, which the forward drains.
    @serve.batch(
        max_batch_size=16,
        batch_wait_timeout_s=0.005,
        max_concurrent_batches=BATCHES_IN_FLIGHT,
        batch_size_fn=_count_rows,
    )
    async def _predict_batch(self, jobs: list[list]) -> list[list[dict]]:
        return _split(await self.queues["predict"].submit([row for job in jobs for row in job]), jobs)

    @serve.batch(
        max_batch_size=16,
        batch_wait_timeout_s=0.005,
        max_concurrent_batches=BATCHES_IN_FLIGHT,
        batch_size_fn=_count_rows,
    )
    async def _generate_batch(self, jobs: list[list]) -> list[list]:
        return _split(await self.queues["generate"].submit([row for job in jobs for row in job]), jobs)

    def _encode(self, fn, *args, **kwargs):
        from ptv2 import serving as sv

        try:
            return fn(self.base, *args, **kwargs)
        except sv.ServingError as e:
            raise serving_error(e) from e

    def _check_count(self, n: int) -> None:
        if n > self.o.max_batch_size:
            raise HTTPError(400, f"{n} inputs in one request; this server takes at most {self.o.max_batch_size}")

    async def _generations(self, prompt, texts: list[str], body: Sampling, max_new_tokens: int) -> list:
        from ptv2 import serving as sv

        self._check_count(len(texts))
        if max_new_tokens > self.o.max_new_tokens:
            raise HTTPError(400, f"at most {self.o.max_new_tokens} new tokens per request, {max_new_tokens} asked")
        rows = [
            self._encode(
                sv.encode_generate,
                prompt,
                text,
                max_new_tokens=max_new_tokens,
                raw=body.raw,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=getattr(body, "top_k", 0),
                seed=body.seed,
                stop=body.stops(),
                max_input_tokens=self.o.max_input_tokens,
            )
            for text in texts
        ]
        out = await self._generate_batch(rows)
        failed = next((i for i, g in enumerate(out) if g.error), None)
        if failed is not None:
            raise HTTPError(500, f"input {failed} could not be continued: {out[failed].error}", "server_error")
        return out

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "base": self.base.name_or_path, "prompts": len(self.entries), "loaded": len(self.bank)}

    @app.get("/v1/prompts")
    async def list_prompts(self, request: Request) -> dict:
        self._auth(request)
        await self._sync()
        rows = []
        for name, entry in sorted(self.entries.items()):
            loaded = self.bank.peek(name)
            row = {"name": name, "source": entry["source"], "version": entry.get("version"), "loaded": bool(loaded)}
            if loaded is not None:
                row.update({k: v for k, v in loaded.describe().items() if k not in row and k != "source"})
                row["pinned"] = loaded.source
                row["weights_sha256"] = loaded.weights_sha256()
            failure = self.failures.get(name)
            if failure is not None:
                row["error"] = failure
            rows.append(row)
        return {"base": self.base.name_or_path, "prompts": rows}

    @app.post("/v1/prompts", status_code=201)
    async def add_prompt(self, body: AddPrompt, request: Request) -> dict:
        """Add (or replace) a prompt: verified here before any replica serves it."""
        from ptv2 import serving as sv

        self._admin(request)
        try:
            sv.check_name(body.name)
        except sv.ServingError as e:
            raise serving_error(e) from e
        try:
            entry = {"name": body.name, **await asyncio.to_thread(pin, self.o.tracking_uri, body.source)}
        except FetchError as e:
            raise HTTPError(404, str(e), "not_found_error") from e
        try:
            prompt = await self._load(entry)
        except (ArtifactError, FetchError, sv.ServingError) as e:
            raise HTTPError(422, str(e)) from e
        await self.catalog.put.remote(entry)
        self.entries[body.name] = entry
        return {"name": body.name, "version": entry["version"], **prompt.describe(), "source": body.source}

    @app.delete("/v1/prompts/{name}")
    async def remove_prompt(self, name: str, request: Request) -> dict:
        self._admin(request)
        if not await self.catalog.remove.remote(name):
            raise HTTPError(404, f"no prompt {name!r} is served", "not_found_error", prompts=sorted(self.entries))
        self.entries.pop(name, None)
        self.bank.remove(name)
        return {"removed": name}

    @app.post("/v1/prompts/refresh")
    async def refresh(self, request: Request) -> dict:
        """Re-resolve registry aliases now (they are also re-resolved every refresh_s)."""
        self._admin(request)
        return {"changes": await self._refresh()}

    @app.get("/v1/stats")
    async def batch_stats(self, request: Request) -> dict:
        self._auth(request)
        return {kind: dict(s) for kind, s in self.stats.items()} | {"batching": self.o.batching}

    @app.post("/v1/predict")
    async def predict(self, body: PredictBody, request: Request) -> dict:
        """Classify texts (seq-cls) or tag words (token-cls) with a prompt."""
        from ptv2 import serving as sv

        self._auth(request)
        prompt = await self._prompt(body.prompt)
        items = body.items()
        self._check_count(len(items))
        rows = [self._encode(sv.encode_predict, prompt, x, body.truncate, self.o.max_input_tokens) for x in items]
        return {"prompt": prompt.name, "task": prompt.task, "results": await self._predict_batch(rows)}

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
        await self._sync()
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "ptv2"} for name in sorted(self.entries)
            ],
        }


# ---- running it ---------------------------------------------------------------------------------------------
def build_app(options: ServeOptions, entries: list[dict]):
    """The Serve application: the catalogue (holding `entries`) and the replicas."""
    catalog = PromptCatalog.bind([{k: e[k] for k in ("name", "source", "pinned", "version")} for e in entries])
    actor = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor["num_gpus"] = options.gpus_per_replica
    server = PromptServer.options(
        num_replicas=options.replicas,
        # room for a full predict batch, a full generate batch and the next ones queueing
        max_ongoing_requests=BATCHES_IN_FLIGHT * options.max_batch_size,
        ray_actor_options=actor,
        max_constructor_retry_count=1,  # a prompt that does not verify will not verify on a retry
        health_check_period_s=10,
    )
    return server.bind(options.model_dump(), catalog)


def start(options: ServeOptions, entries: list[dict], address: str | None = None, num_cpus: int | None = None):
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
        return serve.run(build_app(options, entries), name=APP_NAME, route_prefix="/")
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


def serve_forever(options: ServeOptions, entries: list[dict], address: str | None = None, echo=print) -> int:
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
            echo(f"  {e['name']:<24} {e['source']}" + (f"  (version {e['version']})" if e.get("version") else ""))
        echo(f"try: curl {url}/v1/prompts")
        while not done.wait(1.0):
            pass
        return 0
    finally:
        echo("stopping")
        stop(started_ray, address)
        for s, handler in previous.items():
            signal.signal(s, handler)
