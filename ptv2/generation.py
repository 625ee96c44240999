"""Continuing text with many prompts at once: continuous batching over one KV cache.

`Decoder` holds the rows being continued on one served base, each with its own prompt (a deep
prefix or a soft prompt) and its own sampling. At every step each row gets one token; a row
leaves when it ends (end of sequence, a stop string, its max_new_tokens) and its part of the
cache with it, and new rows join between steps: their prefill runs as one batch, then their
cache is merged into the running one (left-padded to a common length and masked), so a request
that arrives while others decode waits for one step, not for the whole batch. Greedy rows give
what the prompt gives alone; a sampled row draws from its own seeded generator, so it samples
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ptv2.errors import first_line
from ptv2.infer import apply_template
from ptv2.serving import BadInput, InputTooLong, LoadedPrompt, Row, ServedBase, WrongTask, capacity


@dataclass
class GenerateRow(Row):
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # this row could not be continued (its batch went on without it)


def encode_generate(
    base: ServedBase,
    prompt: LoadedPrompt,
    text: str,
    *,
    max_new_tokens: int = 32,
    raw: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    max_input_tokens: int | None = None,
) -> GenerateRow:
    """Tokenize one text to continue, laid out with the prompt's stored template unless `raw`."""
    if not prompt.task.generates:
        raise WrongTask(f"prompt {prompt.name!r} is a {prompt.task} prompt; generate needs causal-lm")
    if not isinstance(text, str) or not text.strip():
        raise BadInput("empty input: generate needs a non-empty text")
    if max_new_tokens < 1:
        raise BadInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (0 <= temperature <= MAX_TEMPERATURE and 0 < top_p <= 1 and isinstance(top_k, int) and top_k >= 0):
        raise BadInput(
            f"sampling needs 0 <= temperature <= {MAX_TEMPERATURE:g}, 0 < top_p <= 1 and an integer top_k >= 0 "
            f"(got {temperature}, {top_p}, {top_k})"
        )
    laid_out = text if raw else apply_template(prompt.template, [text])[0]
    ids = base.tokenize(laid_out)["input_ids"]
    if not ids:
        raise BadInput("the input has no tokens for this tokenizer")
    room = capacity(base, prompt, max_input_tokens)
    if len(ids) + max_new_tokens > room:
        raise InputTooLong(
            f"input is {len(ids)} tokens and {max_new_tokens} more were asked for; prompt {prompt.name!r} "
            f"leaves room for {room} in all"
        )
    return GenerateRow(
        prompt=prompt,
        ids=list(ids),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(s for s in stop if s),
    )


def chat_text(base: ServedBase, prompt: LoadedPrompt, messages: Sequence[tuple[str, str]]) -> str:
    """The text a chat request continues (roles and contents, in order). A prompt trained with a
    template (`data.prompt_template`) learnt one layout, one user turn: the request must be that
    one user message, laid out the same way. A prompt stored without one takes the base
    tokenizer's chat template over the whole conversation."""
    if not messages:
        raise BadInput("messages is empty")
    roles = [role for role, _ in messages]
    if prompt.template is not None:
        if roles != ["user"]:
            raise BadInput(
                f"prompt {prompt.name!r} was trained on one user turn laid out as {prompt.template!r}: send one "
                f"user message (got {', '.join(roles)})"
            )
        return apply_template(prompt.template, [messages[0][1]])[0]
    tokenizer = base.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"prompt {prompt.name!r} has no stored template and {base.name_or_path} has no chat template")
    if roles[-1] != "user":
        raise BadInput(f"the last message must be the user's, not the {roles[-1]}'s")
    text = base.render_chat([{"role": r, "content": c} for r, c in messages])
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text  # tokenizing adds it again


# Below this temperature sampling is greedy decoding: dividing logits by ~1e-39 overflows them to
# inf (and softmax to NaN), and anything this cold picks the argmax anyway (vLLM's threshold).
GREEDY_BELOW = 1e-5
MAX_TEMPERATURE = 10.0


class _Sampler:
    """A row's next-token choice: greedy at temperature ~0, else temperature/top-k/top-p sampling
    (transformers' own warpers) from the row's own seeded generator, so a row samples the same
    tokens whatever else shares its batch."""

    def __init__(self, row: GenerateRow, device: torch.device) -> None:
        self.greedy = row.temperature < GREEDY_BELOW
        self.warpers = []
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(row.temperature))
            if row.top_k:
                self.warpers.append(TopKLogitsWarper(row.top_k))
            if row.top_p < 1:
                self.warpers.append(TopPLogitsWarper(row.top_p))
            seed = row.seed if row.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        scores = logits[None]
        for warper in self.warpers:
            scores = warper(None, scores)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


def _eos_ids(base: ServedBase) -> set[int]:
    eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = base.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _stopped(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@dataclass(eq=False)
class _Running:
    """A row being continued: its sampler, the tokens it has, and what of its text went out."""

    row: GenerateRow
    sampler: _Sampler
    on_text: Callable[[str], None] | None  # receives the text as it grows (streaming)
    new: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already handed to on_text
    cancelled: bool = False


class Decoder:
    """The rows being continued on `base` (see the module docstring). Not thread-safe: one model
    thread calls `admit` and `step` (it holds the base's lock around each forward)."""

    def __init__(self, base: ServedBase) -> None:
        if base.lm_head is None:
            raise WrongTask("the served base has no LM head to generate with")
        self.base, self.eos = base, _eos_ids(base)
        self.running: list[_Running] = []
        self.cache = self.mask = self.position = None
        self.pending: torch.Tensor | None = None  # each running row's next input token

    def __len__(self) -> int:
        return len(self.running)

    @property
    def width(self) -> int:
        """Positions every running row's cache holds now (the longest, the others left-padded)."""
        return 0 if self.mask is None else self.mask.shape[1]

    @torch.inference_mode()
    def admit(self, rows: Sequence[GenerateRow], on_text=None) -> list[tuple[GenerateRow, Generation]]:
        """Prefill `rows` as one batch and let them join; returns those that ended at their first
        token. `on_text`: one callback per row (or None) that receives its text as it grows."""
        if not rows:
            return []
        base = self.base
        batch = base.batch_inputs(rows, side="left", cache="growing")  # every row's last input at the end
        with base.lock:
            hidden = base.body(**batch.kwargs, use_cache=True).last_hidden_state[:, -1]
        joining = [
            _Running(r, _Sampler(r, base.device), (on_text or [None] * len(rows))[i]) for i, r in enumerate(rows)
        ]
        kwargs = batch.kwargs
        self._join(kwargs[base.cache_kwarg], kwargs["attention_mask"], kwargs["position_ids"][:, -1] + 1, joining)
        return self._advance(base.lm_head(hidden).float(), first=len(self.running) - len(joining))

    @torch.inference_mode()
    def step(self) -> list[tuple[GenerateRow, Generation]]:
        """One token for every running row; returns the rows that ended with it."""
        if not self.running:
            return []
        base = self.base
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.running), 1)], dim=1)
        kwargs = {
            "inputs_embeds": base.body.get_input_embeddings()(self.pending[:, None]),
            "attention_mask": self.mask,
            "position_ids": self.position[:, None],
            base.cache_kwarg: self.cache,
        }
        with base.lock:
            hidden = base.body(**kwargs, use_cache=True).last_hidden_state[:, -1]
        self.position = self.position + 1
        return self._advance(base.lm_head(hidden).float(), first=0)

    def cancel(self, row: GenerateRow) -> None:
        """Drop `row` at the next step (its client went away)."""
        for running in self.running:
            if running.row is row:
                running.cancelled = True

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _join(self, cache, mask: torch.Tensor, position: torch.Tensor, joining: list[_Running]) -> None:
        """Merge the joining rows' cache (and mask, positions) into the running batch's."""
        if not self.running:
            self.cache, self.mask, self.position = cache, mask, position
            self.pending = position.new_zeros(len(joining))
        else:
            width = max(self.width, mask.shape[1])
            layers = []
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
                values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
                layers.append((keys, values))
            self.cache = type(self.cache)(layers, config=self.base.config)
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)], dim=0)
            self.position = torch.cat([self.position, position])
            self.pending = torch.cat([self.pending, self.pending.new_zeros(len(joining))])
        self.running += joining

    def _advance(self, logits: torch.Tensor, first: int) -> list[tuple[GenerateRow, Generation]]:
        """Sample the rows from `first` on from their `logits` rows; the ended ones leave."""
        ended, keep = [], []
        for j, running in enumerate(self.running):
            if j < first:
                keep.append(j)
                continue
            outcome = self._next(running, logits[j - first])
            if outcome is None:
                keep.append(j)
            else:
                ended.append((running.row, outcome))
        if len(keep) < len(self.running):
            self._keep(keep)
        return ended

    def _next(self, running: _Running, logits: torch.Tensor) -> Generation | None:
        """Sample `running`'s next token; its Generation when that ends it, else None."""
        r, base = running.row, self.base
        if running.cancelled:
            return Generation(base.decode(running.new), "cancelled", len(r.ids), running.new)
        try:
            token = running.sampler(logits)
        except Exception as e:  # this row alone fails: the batch goes on without it
            return Generation("", "error", len(r.ids), running.new, error=first_line(e))
        reason = "stop" if token in self.eos else None
        if reason is None:
            running.new.append(token)
            self.pending[self.running.index(running)] = token
        text = base.decode(running.new)
        cut = _stopped(text, r.stop) if r.stop else None
        if cut is not None:
            reason, text = "stop", text[:cut]
        elif reason is None and len(running.new) >= r.max_new_tokens:
            reason = "length"
        self._emit(running, text, final=reason is not None)
        return None if reason is None else Generation(text, reason, len(r.ids), running.new)

    def _emit(self, running: _Running, text: str, final: bool) -> None:
        """Hand on the text that can no longer change: not a trailing partial character, nor a
        tail that may still become a stop string."""
        if running.on_text is None:
            return
        ready = len(text)
        if not final:
            while ready and text[ready - 1] == "\ufffd":  # a multi-byte character not yet complete
                ready -= 1
            hold = max((len(s) - 1 for s in running.row.stop), default=0)
            ready = max(running.sent, ready - hold)
        if ready > running.sent:
            running.on_text(text[running.sent : ready])
            running.sent = ready

    def _keep(self, keep: list[int]) -> None:
        self.running = [self.running[j] for j in keep]
        if not keep:
            self.cache = self.mask = self.position = self.pending = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position, self.pending = self.mask[index], self.position[index], self.pending[index]
        # the columns no remaining row uses (left padding of rows that left) go too
        start = int(self.mask.any(0).int().argmax())
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` ([batch, width'] masks, [batch, heads, width', dim] keys/values) with zeros on the
    left of its sequence dimension up to `width`."""
    dim = 1 if x.dim() == 2 else 2
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def generate(base: ServedBase, rows: Sequence[GenerateRow]) -> list[Generation]:
    """Continue every row, all prompts mixed, until each has ended; results in `rows`' order."""
    decoder = Decoder(base)
    done = {id(row): result for row, result in decoder.admit(rows)}
    while len(decoder):
        done.update((id(row), result) for row, result in decoder.step())
    return [done[id(r)] for r in rows]
