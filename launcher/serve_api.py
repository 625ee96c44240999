"""The HTTP surface of `ptv2 serve`: the FastAPI app the replicas serve, its request bodies
(unknown fields refused by name), errors as OpenAI-style JSON, and the request body size limit."""

# No `from __future__ import annotations` here: FastAPI reads the request bodies' annotations at
# runtime through Serve's ingress wrapper, which strings defeat.
import logging
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ptv2 import errors as sv

logger = logging.getLogger("ptv2.serve")
MAX_CHARS = 100_000  # per text: far past any model's positions; the token check says what is too long

Text = Annotated[str, StringConstraints(max_length=MAX_CHARS)]
Words = Annotated[list[Text], Field(max_length=MAX_CHARS // 8)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AddPrompt(_Body):
    name: str
    source: Annotated[str, StringConstraints(min_length=1, max_length=1000)]


class PredictBody(_Body):
    prompt: str
    input: Text | Words | None = Field(None, description="a text (seq-cls) or words (token-cls)")
    inputs: list[Text | Words] | None = Field(None, min_length=1, max_length=1024)
    truncate: bool = Field(True, description="cut inputs to the prompt's trained max_length, as ptv2 predict does")

    @model_validator(mode="after")
    def _one_of(self) -> "PredictBody":
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of input and inputs")
        return self

    def items(self) -> list:
        return [self.input] if self.inputs is None else list(self.inputs)


class Sampling(_Body):
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    raw: bool = Field(False, description="send the text as is, without the prompt's stored template")

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateBody(Sampling):
    prompt: str
    input: Text | None = None
    inputs: list[Text] | None = Field(None, min_length=1, max_length=1024)
    max_new_tokens: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> "GenerateBody":
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of input and inputs")
        return self

    def items(self) -> list[str]:
        return [self.input] if self.inputs is None else list(self.inputs)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with the usage (and no choices)


class CompletionBody(BaseModel):
    """OpenAI's /v1/completions request; fields ptv2 cannot honour are refused by name when set
    to anything but their neutral value, unknown ones ignored (clients send extras)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1024)]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    raw: bool = False  # ptv2: skip the prompt's stored template

    def unsupported(self) -> str | None:
        neutral = {
            "n": (self.n, (None, 1)),
            "best_of": (self.best_of, (None, 1)),
            "logprobs": (self.logprobs, (None,)),
            "echo": (self.echo, (None, False)),
            "suffix": (self.suffix, (None, "")),
            "presence_penalty": (self.presence_penalty, (None, 0)),
            "frequency_penalty": (self.frequency_penalty, (None, 0)),
            "logit_bias": (self.logit_bias, (None, {})),
        }
        return next((k for k, (v, ok) in neutral.items() if v not in ok), None)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Text | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The content as one text: a string, or text parts joined (other parts are refused)."""
        if self.role not in ("system", "developer", "user", "assistant"):
            raise HTTPError(400, f"messages[{index}].role: {self.role!r} is not supported", param=f"messages.{index}")
        if self.content is None:
            raise HTTPError(400, f"messages[{index}].content is missing", param=f"messages.{index}.content")
        if isinstance(self.content, str):
            return self.content
        kinds = {p.type for p in self.content} - {"text"}
        if kinds:
            raise HTTPError(400, f"messages[{index}].content: only text parts are supported, not {sorted(kinds)}")
        return "".join(p.text or "" for p in self.content)


class ChatBody(BaseModel):
    """OpenAI's /v1/chat/completions request; as CompletionBody, fields ptv2 cannot honour are
    refused by name when set, unknown ones ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        neutral = {
            "n": (self.n, (None, 1)),
            "presence_penalty": (self.presence_penalty, (None, 0)),
            "frequency_penalty": (self.frequency_penalty, (None, 0)),
            "logit_bias": (self.logit_bias, (None, {})),
            "logprobs": (self.logprobs, (None, False)),
            "top_logprobs": (self.top_logprobs, (None, 0)),
            "tools": (self.tools, (None, [])),
            "tool_choice": (self.tool_choice, (None, "none", "auto")),
            "response_format": (self.response_format, (None, {"type": "text"})),
        }
        return next((k for k, (v, ok) in neutral.items() if v not in ok), None)

    def conversation(self) -> list[tuple[str, str]]:
        """(role, text) of each message; a developer message is a system message."""
        out = []
        for i, m in enumerate(self.messages):
            text = m.text(i)
            out.append(("system" if m.role == "developer" else m.role, text))
        return out


# ---- errors as JSON ------------------------------------------------------------------------------------
class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra


def error_response(status: int, message: str, kind: str = "invalid_request_error", **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


app = FastAPI(title="ptv2 serve", description="Many P-Tuning v2 prompts on one frozen model")


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.kind, **exc.extra)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        return error_response(400, f"malformed JSON: {bad_json.get('ctx', {}).get('error', 'cannot parse the body')}")
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(e.get("loc") == ("body",) for e in errors):
        return error_response(415, f"send the body as JSON (Content-Type: application/json, not {content_type!r})")
    shown = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        shown.append(f"{where}: {e.get('msg')}")
    return error_response(422, "; ".join(shown), param=".".join(str(x) for x in errors[0].get("loc", ())[1:]))


@app.exception_handler(StarletteHTTPException)
async def _starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def _state(scope):
    """The state of the app serving this request: the replica's own copy of `app` (Serve ships the
    ingress app with the deployment class), not necessarily this module's object."""
    return scope["app"].state if "app" in scope else app.state


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over the server's limit (413) before they are read whole."""

    def __init__(self, asgi) -> None:
        self.asgi = asgi

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        limit = getattr(_state(scope), "max_body_bytes", 1 << 20)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(413, f"request body over {limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.asgi(scope, counted, send)
        except _TooLarge:
            await too_large(scope, receive, send)


class Counted:
    """Count every answered request in the replica's metrics (`app.state.metrics`): its route
    (the path template), the prompt it named (set by the route once the prompt is found) and its
    status. Streams are counted when they end."""

    def __init__(self, asgi) -> None:
        self.asgi = asgi

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.asgi(scope, receive, sending)
        finally:
            metrics = getattr(_state(scope), "metrics", None)
            if metrics is not None:
                route = getattr(scope.get("route"), "path", "other")
                metrics.request(route, (scope.get("state") or {}).get("prompt", ""), status)


app.add_middleware(BodyLimit)
app.add_middleware(Counted)  # outermost: it sees BodyLimit's answers too


def serving_error(exc: Exception) -> HTTPError:
    """The HTTP status of a library error: the caller's mistake, named."""
    if isinstance(exc, sv.UnknownPrompt):
        return HTTPError(404, str(exc), "not_found_error", prompts=exc.loaded)
    if isinstance(exc, sv.InputTooLong):
        return HTTPError(413, str(exc))
    return HTTPError(400, str(exc))
