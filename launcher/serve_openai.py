"""OpenAI's response shapes for `ptv2 serve`: completions and chat completions, whole or streamed
as Server-Sent Events in OpenAI's chunk format (`data: {chunk}` lines, `data: [DONE]` last; with
`stream_options.include_usage`, a last chunk with the usage and no choices).

A stream is fed by the model thread: each row's text, as it can no longer change, is put on an
asyncio queue from that thread (`loop.call_soon_threadsafe`), and the request's future ends it.
A client that goes away cancels the request: its rows leave the running batch at the next step.
"""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

from ptv2.scheduler import Generating


def usage(out: list) -> dict:
    prompt, completion = sum(g.prompt_tokens for g in out), sum(len(g.token_ids) for g in out)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(model: str, out: list) -> dict:
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": g.text, "index": i, "logprobs": None, "finish_reason": g.finish_reason} for i, g in enumerate(out)
        ],
        "usage": usage(out),
    }


def chat_completion(model: str, out: list) -> dict:
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": None,
                "finish_reason": g.finish_reason,
            }
            for i, g in enumerate(out)
        ],
        "usage": usage(out),
    }


class Stream:
    """The chunks of one streamed request (`chat`: chat.completion.chunk, else text_completion)."""

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.model, self.chat, self.include_usage = model, chat, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def listeners(self, rows: int) -> list[Callable[[str], None]]:
        """One callback per row, called on the model thread with the row's new text."""
        return [lambda text, i=i: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, text)) for i in range(rows)]

    def _chunk(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    def _choice(self, index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def events(self, request: Generating, rows: int, on_end: Callable[[list], None]) -> AsyncIterator[str]:
        """The SSE lines of `request` (whose `rows` listeners are `listeners(rows)`)."""
        request.future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, None))
        try:
            if self.chat:  # OpenAI's first chat chunk gives the role
                yield self._chunk([self._choice(i, None, None, role=True) for i in range(rows)])
            while (item := await self.queue.get()) is not None:
                index, text = item
                yield self._chunk([self._choice(index, text, None)])
            if request.future.cancelled():
                return
            error = request.future.exception()
            out = [] if error is not None else request.future.result()
            failed = next((g.error for g in out if g.error), None)
            if error is not None or failed:
                message = f"generation failed: {failed or type(error).__name__}"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': 500}})}\n\n"
                return
            yield self._chunk([self._choice(i, None, g.finish_reason) for i, g in enumerate(out)])
            if self.include_usage:
                yield self._chunk([], usage=usage(out))
            yield "data: [DONE]\n\n"
            on_end(out)
        finally:
            if not request.future.done():  # the client went away mid-stream: free its rows
                request.cancel()
