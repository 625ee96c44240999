"""The one batching layer of a served base: a model thread that takes every request's rows from
its queues, whatever their prompts.

Predictions: each turn takes every prediction waiting (whole requests, up to `max_rows`) into one
forward (`ptv2.serving.predict`). Generations: continuous batching (`ptv2.generation.Decoder`):
between two decode steps the requests that arrived join (their prefill batched), within a bound
on running rows and on the cache they may grow to, and finished rows leave, so a short request
that arrives while long ones decode is answered when it is done, not when the longest is.

Callers get `concurrent.futures.Future`s (asyncio code awaits them with `asyncio.wrap_future`).
A request whose rows fail fails alone: a prediction batch that raises is run again request by
request, a row whose sampling fails ends with its error. Subclasses may change how rows are
grouped (the benchmarks' per-prompt baseline does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ptv2.generation import Decoder, GenerateRow, Generation
from ptv2.serving import PredictRow, ServedBase, predict

logger = logging.getLogger("ptv2.serve")


@dataclass(eq=False)
class Generating:
    """A generation request: its rows, the future of their results and what streams them."""

    rows: list[GenerateRow]
    on_text: list[Callable[[str], None] | None]
    future: Future = field(default_factory=Future)
    results: dict[int, Generation] = field(default_factory=dict)  # row index -> result
    created_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when its rows joined, their first token sampled
    done_at: float | None = None
    cancelled: bool = False

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.admitted_at is None else self.admitted_at - self.created_at

    def cancel(self) -> None:
        """The client went away: its rows leave the batch at the next step (or never join)."""
        self.cancelled = True
        self.future.cancel()  # only while it waits to join


@dataclass
class Stats:
    """What the model thread did: batches, rows and prompts per batch, the largest batch."""

    predict_batches: int = 0
    predict_rows: int = 0
    predict_prompts: int = 0
    predict_largest: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # rows running, summed over steps (occupancy = decode_rows / decode_steps)
    decode_largest: int = 0
    generations: int = 0


class Scheduler:
    """The model thread of one served base (see the module docstring)."""

    def __init__(self, base: ServedBase, max_rows: int = 16, max_cache_tokens: int | None = None) -> None:
        """`max_cache_tokens`: the most positions the generation cache may hold over all its rows
        (rows × the longest row's prompt + input + max_new_tokens); default: no bound besides
        `max_rows`."""
        self.base, self.max_rows, self.max_cache_tokens = base, max_rows, max_cache_tokens
        self.stats = Stats()
        self._predictions: deque[tuple[list[PredictRow], Future]] = deque()
        self._generations: deque[Generating] = deque()
        self._running: list[Generating] = []
        self._wake = threading.Condition()
        self._closed = False
        self._decoder: Decoder | None = None
        self._thread = threading.Thread(target=self._serve, name="ptv2-model", daemon=True)
        self._thread.start()

    # ---- what callers do ------------------------------------------------------------------------
    def predict(self, rows: Sequence[PredictRow]) -> Future:
        future: Future = Future()
        with self._wake:
            self._predictions.append((list(rows), future))
            self._wake.notify()
        return future

    def generate(self, rows: Sequence[GenerateRow], on_text: Sequence | None = None) -> Generating:
        """Continue `rows`; `on_text[i]` (optional) receives row i's text as it grows."""
        request = Generating(list(rows), list(on_text or [None] * len(rows)))
        with self._wake:
            self._generations.append(request)
            self._wake.notify()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    # ---- the model thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._predictions or self._generations or self._running):
                    self._wake.wait()
                if self._closed:
                    break
                predictions = self._take_predictions()
            try:
                if predictions:
                    self._predict(predictions)
                self._admit()
                self._step()
            except Exception:  # a bug here must not stop the thread every request waits on
                logger.exception("the model thread's turn failed")
                for _, future in predictions:
                    if not future.done():
                        future.set_exception(RuntimeError("the model thread failed; see the server's log"))
        for _, future in self._predictions:
            future.cancel()

    def _take_predictions(self) -> list[tuple[list[PredictRow], Future]]:
        jobs, n = [], 0
        while self._predictions and (not jobs or n + len(self._predictions[0][0]) <= self.max_rows):
            rows, future = self._predictions.popleft()
            if future.set_running_or_notify_cancel():
                jobs.append((rows, future))
                n += len(rows)
        return jobs

    def run_predictions(self, rows: list[PredictRow]) -> list[dict]:
        """One batch of predictions (all prompts mixed)."""
        return predict(self.base, rows)

    def _predict(self, jobs: list[tuple[list[PredictRow], Future]]) -> None:
        flat = [row for rows, _ in jobs for row in rows]
        s = self.stats
        s.predict_batches, s.predict_rows = s.predict_batches + 1, s.predict_rows + len(flat)
        s.predict_prompts += len({id(getattr(r, "prompt", None)) for r in flat})
        s.predict_largest = max(s.predict_largest, len(flat))
        try:
            results = self.run_predictions(flat)
        except Exception:  # one request's rows must not fail the others': each runs alone
            for rows, future in jobs:
                try:
                    future.set_result(self.run_predictions(rows))
                except Exception as e:
                    future.set_exception(e)
            return
        start = 0
        for rows, future in jobs:
            future.set_result(results[start : start + len(rows)])
            start += len(rows)

    def admissible(self, request: Generating, running: int, extent: int) -> bool:
        """Whether `request` may join a batch of `running` rows whose cache may grow to `extent`
        positions per row."""
        if running + len(request.rows) > self.max_rows:
            return running == 0  # a request larger than max_rows still runs, alone
        if self.max_cache_tokens is None:
            return True
        return (running + len(request.rows)) * max(extent, _extent(request)) <= self.max_cache_tokens or not running

    def choose(self, waiting: deque[Generating], running: int, extent: int) -> list[Generating]:
        """Which waiting requests join now (taken out of `waiting`): in arrival order, as many as
        the bounds allow."""
        joining = []
        while waiting and self.admissible(waiting[0], running, extent):
            request = waiting.popleft()
            joining.append(request)
            running, extent = running + len(request.rows), max(extent, _extent(request))
        return joining

    def _admit(self) -> None:
        """Let the generation requests waiting join the running batch, as far as the bounds allow."""
        running = sum(len(r.rows) - len(r.results) for r in self._running)
        extent = max((_extent(r) for r in self._running), default=0)
        with self._wake:
            chosen = self.choose(self._generations, running, extent)
        joining = [r for r in chosen if r.future.set_running_or_notify_cancel()]
        if not joining:
            return
        if self._decoder is None:
            self._decoder = Decoder(self.base)
        rows = [row for r in joining for row in r.rows]
        listeners = [f for r in joining for f in r.on_text]
        try:
            ended = self._decoder.admit(rows, listeners)
        except Exception:  # the joint prefill failed: each request tries alone
            ended = []
            for request in joining:
                try:
                    ended += self._decoder.admit(request.rows, request.on_text)
                except Exception as e:
                    request.future.set_exception(e)
            joining = [r for r in joining if not r.future.done()]
        now = time.monotonic()
        for request in joining:
            request.admitted_at = now
        self._running += joining
        self._finish(ended)

    def _step(self) -> None:
        if self._decoder is None or not len(self._decoder):
            return
        for request in self._running:
            if request.cancelled:
                for row in request.rows:
                    self._decoder.cancel(row)
        n = len(self._decoder)
        try:
            ended = self._decoder.step()
        except Exception as e:  # the whole batch's forward failed: every running request with it
            for request in self._running:
                if not request.future.done():
                    request.future.set_exception(e)
            self._running, self._decoder = [], None
            return
        s = self.stats
        s.decode_steps, s.decode_rows, s.decode_largest = (
            s.decode_steps + 1,
            s.decode_rows + n,
            max(s.decode_largest, n),
        )
        self._finish(ended)

    def _finish(self, ended: list[tuple[GenerateRow, Generation]]) -> None:
        """Record ended rows; a request whose every row ended gets its results."""
        owner = {id(row): (request, i) for request in self._running for i, row in enumerate(request.rows)}
        for row, result in ended:
            request, i = owner[id(row)]
            request.results[i] = result
        still = []
        for request in self._running:
            if len(request.results) < len(request.rows):
                still.append(request)
                continue
            self.stats.generations += 1
            request.done_at = time.monotonic()
            if not request.future.done():
                request.future.set_result([request.results[i] for i in range(len(request.rows))])
        self._running = still


def _extent(request: Generating) -> int:
    """The most cache positions a row of `request` may come to hold."""
    return max(r.prompt.length + len(r.ids) + r.max_new_tokens for r in request.rows)
