"""Many prompts on one frozen model: a bank of verified prompts and mixed-prompt batches.

A P-Tuning v2 prompt is nothing but its own keys/values at every layer (plus a task head), so rows
of different prompts can share one forward of the frozen model: each row brings its own prompt,
laid out the one way training lays prompts out (`ptv2.prompt.prompt_inputs`: prefixes and soft
prompts of different lengths padded and masked). Each row then gets its own task head: the body
runs once, the heads (a few thousand values each) are applied per prompt, each prompt holding its
own head modules (`ptv2.tasks`). The result equals running each prompt alone (fp32 logits within
float rounding: tests/test_serving.py).

`ServedBase` is the frozen model (body, LM head, tokenizer); `PromptBank` the verified prompts
for it (least recently used out past a count or byte budget); `predict` runs a mixed batch of
classifications; `ptv2.generation` continues text. No Ray or MLflow here: launcher/serve.py puts
this behind Ray Serve.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ptv2 import fingerprint as fp
from ptv2.artifact import FOLDED, check_base, data_settings, read_manifest
from ptv2.errors import (  # noqa: F401 (the serving errors are part of this module's API)
    ArtifactError,
    BadInput,
    InputTooLong,
    ServingError,
    UnknownPrompt,
    WrongTask,
    first_line,
)
from ptv2.geometry import Geometry
from ptv2.infer import pad_id
from ptv2.model import HEAD_MODULES, cache_argument
from ptv2.prompt import Prompt, PromptedBatch, folded_prompt, prompt_inputs
from ptv2.settings import PromptConfig
from ptv2.tasks import Task, task_of

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ServingError(
            f"prompt name {name!r} is not valid: 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# ---- the frozen base ------------------------------------------------------------------------------
class _ParamView:
    """A config plus chosen named parameters: what `check_base`/`fingerprint` read of a model."""

    def __init__(self, config, pairs: list[tuple[str, torch.Tensor]]) -> None:
        self.config, self._pairs = config, pairs

    def named_parameters(self):
        return iter(self._pairs)


@dataclass
class _HeadTemplate:
    """The head module transformers builds for a task (weights come from each prompt)."""

    name: str  # "classifier" | "score"
    module: nn.Module
    uses_pooler: bool  # BERT's sequence classifier reads the pooler's output


class ServedBase:
    """The frozen model one server replica holds: body, LM head (decoders), tokenizer.

    Decoders are loaded with their causal-LM class (body + LM head), encoders as the bare body
    (with BERT's pooler): every task's prompt then shares the same weights, and each prompt's
    own head is applied on top."""

    def __init__(self, model: PreTrainedModel, tokenizer, name_or_path: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.body = model.base_model
        self.config = model.config
        self.geometry = Geometry.of(model.config)
        self.tokenizer = tokenizer
        self.name_or_path = str(name_or_path)
        self.pad_id = pad_id(tokenizer)
        self.lm_head = model.get_output_embeddings() if self.geometry.is_decoder else None
        self.cache_kwarg = cache_argument(model)
        # Names as the task classes (what prompts are trained and fingerprinted on) call them:
        # a bare body's parameters carry its base_model_prefix there ("bert.", "model.").
        named = model.named_parameters(remove_duplicate=False)
        if model.base_model is model:
            self._params = {f"{model.base_model_prefix}.{n}": p for n, p in named}
        else:
            self._params = dict(named)
        self._heads: dict[tuple[str, int], HeadTemplate] = {}
        self._heads_lock = threading.Lock()  # prompts load on several threads
        # one forward at a time: batches from several callers must not interleave on the model
        self.lock = threading.Lock()
        # a fast tokenizer's Rust state is borrowed mutably by truncation settings: callers in
        # several threads (request handlers, batch workers) take turns
        self._tok_lock = threading.Lock()

    def tokenize(self, text, **kwargs):
        with self._tok_lock:
            return self.tokenizer(text, **kwargs)

    def decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """A conversation through the tokenizer's chat template, ready for the reply."""
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        tokenizer=None,
        **kwargs,
    ) -> ServedBase:
        """`tokenizer`: default the base's own; `kwargs` go to `from_pretrained` (e.g. attn_implementation)."""
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        geometry = Geometry.of(config)  # refuse unsupported architectures before loading a weight
        auto = AutoModelForCausalLM if geometry.is_decoder else AutoModel
        model = auto.from_pretrained(
            name_or_path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model.to(device), tokenizer, str(name_or_path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- verification ----------------------------------------------------------------------------
    def verify(self, manifest: dict, name: str) -> None:
        """Refuse a prompt trained on another base model, naming both fingerprints.

        The prompt's fingerprint lists the frozen tensors its task class had; they are looked up
        here under those names (a tensor the served model lacks is reported as missing)."""
        try:
            want = manifest["base_model"]
            expected = want["fingerprint"]
            names = list(expected["tensors"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"prompt {name!r}: the manifest has no base-model fingerprint ({e})") from e
        view = _ParamView(self.config, [(n, self._params[n]) for n in names if n in self._params])
        try:
            check_base(manifest, view)
        except ArtifactError as e:
            actual = fp.fingerprint(view, self.config, exclude=manifest.get("head") or [])
            raise ArtifactError(
                f"prompt {name!r} is for another base model: trained on {want.get('name_or_path')} "
                f"(fingerprint {str(expected.get('weights_sha256'))[:12]}), served base {self.name_or_path} "
                f"(fingerprint {actual['weights_sha256'][:12]}): {e}"
            ) from e

    def head_template(self, task: str | Task, num_labels: int) -> HeadTemplate:
        """The task's head module for `num_labels` as transformers builds it, on the meta device:
        no weights of its own; each prompt gets a copy holding its weights (`_own`)."""
        with self._heads_lock:
            key = (str(task), num_labels)
            if key not in self._heads:
                config = copy.deepcopy(self.config)
                config.num_labels = num_labels
                with torch.device("meta"):
                    model = task_of(task).auto_class.from_config(config)
                name = next((n for n in HEAD_MODULES if isinstance(getattr(model, n, None), nn.Module)), None)
                if name is None:
                    raise ArtifactError(f"{type(model).__name__} has no head module among {', '.join(HEAD_MODULES)}")
                uses_pooler = getattr(model.base_model, "pooler", None) is not None
                self._heads[key] = HeadTemplate(name, getattr(model, name), uses_pooler)
            return self._heads[key]

    # ---- one batch ---------------------------------------------------------------------------------
    def batch_inputs(self, rows: Sequence[Row], side: str, cache: str = "replayable") -> PromptedBatch:
        """The body's keyword arguments for `rows`, each with its own prompt: token ids padded on
        `side` ("left" to generate: every row's last input at the end)."""
        length = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        types = torch.zeros(len(rows), length, dtype=torch.long) if any(r.token_types for r in rows) else None
        for i, r in enumerate(rows):
            where = slice(0, len(r.ids)) if side == "right" else slice(length - len(r.ids), length)
            ids[i, where], mask[i, where] = torch.tensor(r.ids), 1
            if types is not None and r.token_types:
                types[i, where] = torch.tensor(r.token_types)
        dev = self.device
        return prompt_inputs(
            [r.prompt.module for r in rows],
            ids.to(dev),
            mask.to(dev),
            embed=self.body.get_input_embeddings(),
            geometry=self.geometry,
            cache_config=self.config if self.geometry.is_decoder else None,  # BERT builds its own layers
            cache_kwarg=self.cache_kwarg,
            dtype=self.dtype,
            token_type_ids=None if types is None else types.to(dev),
            cache=cache,
        )


@dataclass
class HeadTemplate:
    """The head module transformers builds for a task, on the meta device (weights come from each
    prompt)."""

    name: str  # "classifier" | "score"
    module: nn.Module
    uses_pooler: bool  # BERT's sequence classifier reads the pooler's output


# ---- prompts and the bank ---------------------------------------------------------------------------
@dataclass(eq=False)
class LoadedPrompt:
    """A verified prompt, ready for batches on one served base."""

    name: str
    task: Task
    labels: list[str] | None
    module: Prompt  # its folded prompt (any kind), on the base's device and in its dtype
    head: object | None  # the task's head (`Task.head`), or None: the base's LM head
    template: str | None
    max_length: int | None
    path: Path
    manifest: dict
    source: str | None = None
    nbytes: int = 0

    @property
    def length(self) -> int:
        return self.module.length

    @classmethod
    def load(cls, base: ServedBase, name: str, path: str | Path, source: str | None = None) -> LoadedPrompt:
        """Verify (checksums, shapes, base fingerprint) and load the folded prompt in `path`."""
        check_name(name)
        path = Path(path)
        manifest = read_manifest(path)
        base.verify(manifest, name)
        try:
            task = task_of(manifest.get("task"))
            config = PromptConfig(**manifest["prompt"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: the manifest's task or prompt settings are not valid: {e}") from e
        labels = manifest.get("labels")
        if task.labelled and (not isinstance(labels, list) or len(labels) < 2):
            raise ArtifactError(f"{path}: a {task} prompt needs its label names in the manifest")
        with safe_open(path / FOLDED, "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        weight = tensors.pop("prompt.embedding.weight", None)
        if (weight is None) != (config.length == 0):
            raise ArtifactError(f"{path / FOLDED}: the prompt table does not match length {config.length}")
        heads = {k.removeprefix("head."): v.to(device=base.device, dtype=base.dtype) for k, v in tensors.items()}
        table = None if weight is None else weight.to(device=base.device, dtype=base.dtype)
        module = folded_prompt(config.method, table, base.geometry)
        try:
            head = task.head(base, heads, labels)
        except RuntimeError as e:  # load_state_dict: tensors of other shapes or names
            raise ArtifactError(f"the {task} head does not fit this base: {first_line(e)}") from e
        data = data_settings(manifest, path)
        prompt = cls(
            name=name,
            task=task,
            labels=list(labels) if labels else None,
            module=module,
            head=head,
            template=data["prompt_template"],
            max_length=data["max_length"],
            path=path,
            manifest=manifest,
            source=source,
            nbytes=module.nbytes + sum(v.numel() * v.element_size() for v in heads.values()),
        )
        prompt._check_head(base)
        return prompt

    def _check_head(self, base: ServedBase) -> None:
        """Run the head once on zeros: its output must have one score per label."""
        if self.head is None:
            return
        one = PromptedBatch({"attention_mask": torch.ones(1, 1, dtype=torch.long, device=base.device)}, 0, 0)
        with torch.inference_mode():
            zeros = torch.zeros(1, 1, base.geometry.hidden_size, device=base.device, dtype=base.dtype)
            out = self.head.logits(zeros, one, [0])
        if out[0].shape[-1] != len(self.labels):
            raise ArtifactError(f"{self.path}: the head gives {out[0].shape[-1]} scores for {len(self.labels)} labels")

    def weights_sha256(self) -> str:
        """A digest of the weights this prompt serves with now, as held in memory (its prompt and
        its head's own modules): equal to a fresh load's unless something wrote into them."""
        held = {f"prompt.{k}": v for k, v in self.module.state_dict().items()}
        for part, module in (self.head.modules() if self.head is not None else {}).items():
            held.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
        h = hashlib.sha256()
        for name, tensor in sorted(held.items()):
            h.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "task": self.task.name,
            "method": self.manifest["prompt"]["method"],
            "length": self.length,
            "labels": self.labels,
            "template": self.template,
            "max_length": self.max_length,
            "base_model": self.manifest["base_model"].get("name_or_path"),
            "created": self.manifest.get("created"),
            "source": self.source,
            "bytes": self.nbytes,
        }


class PromptBank:
    """The verified prompts of one served base, bounded by count and bytes (least recently used
    out). Thread-safe; a prompt replaced while a batch runs finishes that batch unchanged."""

    def __init__(self, base: ServedBase, max_prompts: int = 64, max_bytes: int = 1 << 30) -> None:
        if max_prompts < 1 or max_bytes < 1:
            raise ValueError("a prompt bank holds at least one prompt and one byte")
        self.base, self.max_prompts, self.max_bytes = base, max_prompts, max_bytes
        self._items: OrderedDict[str, LoadedPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path, source: str | None = None) -> tuple[LoadedPrompt, list[str]]:
        """Verify and add (or replace) prompt `name`; returns it and the names evicted for it.
        A prompt that fails verification changes nothing."""
        prompt = LoadedPrompt.load(self.base, name, path, source)
        if prompt.nbytes > self.max_bytes:
            raise ArtifactError(f"prompt {name!r} takes {prompt.nbytes} bytes, over the bank's {self.max_bytes}")
        with self._lock:
            self._items.pop(name, None)
            self._items[name] = prompt
            evicted = []
            while len(self._items) > self.max_prompts or self._bytes() > self.max_bytes:
                evicted.append(self._items.popitem(last=False)[0])
        return prompt, evicted

    def get(self, name: str) -> LoadedPrompt:
        with self._lock:
            if name not in self._items:
                raise UnknownPrompt(name, list(self._items))
            self._items.move_to_end(name)
            return self._items[name]

    def peek(self, name: str) -> LoadedPrompt | None:
        """The prompt, without counting as a use."""
        with self._lock:
            return self._items.get(name)

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._items.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def _bytes(self) -> int:
        return sum(p.nbytes for p in self._items.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# ---- requests ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One input of a batch, tokenized: the prompt, token ids (and token types)."""

    prompt: LoadedPrompt
    ids: list[int]
    token_types: list[int] | None = None


@dataclass
class PredictRow(Row):
    words: list[str] | None = None  # token-cls: the words tagged
    word_ids: list[int | None] | None = None


def capacity(base: ServedBase, prompt: LoadedPrompt, cap: int | None) -> int:
    """How many tokens a row of `prompt` may have on `base` (beside the prompt; `cap`: the server's)."""
    room = (base.geometry.max_positions or 1 << 30) - prompt.length
    return min(room, cap) if cap else room


def encode_predict(
    base: ServedBase,
    prompt: LoadedPrompt,
    text: str | Sequence[str],
    truncate: bool = True,
    max_input_tokens: int | None = None,
) -> PredictRow:
    """Tokenize one input as `ptv2 predict` does: a text (seq-cls) or words (token-cls; a string
    is split on spaces), cut to the prompt's trained max_length when `truncate`, else refused
    past it. Inputs beyond what the model takes beside the prompt are refused either way."""
    if not prompt.task.labelled:
        raise WrongTask(f"prompt {prompt.name!r} is a {prompt.task} prompt; predict needs seq-cls or token-cls")
    source, kwargs, words = prompt.task.predict_input(text)
    room = capacity(base, prompt, max_input_tokens)
    limit = min(prompt.max_length or room, room)
    enc = base.tokenize(source, **kwargs)
    n = len(enc["input_ids"][0])
    if n == 0:
        raise BadInput("the input has no tokens for this tokenizer")
    if n > limit:
        if not truncate:
            raise InputTooLong(f"input is {n} tokens; prompt {prompt.name!r} takes at most {limit} (or set truncate)")
        enc = base.tokenize(source, truncation=True, max_length=limit, **kwargs)
    return PredictRow(
        prompt=prompt,
        ids=list(enc["input_ids"][0]),
        token_types=list(enc["token_type_ids"][0]) if "token_type_ids" in enc else None,
        words=words,
        word_ids=enc.word_ids(0) if words is not None else None,
    )


def groups(rows: Sequence[Row]) -> dict[int, list[int]]:
    """Row indices by prompt (object identity: a prompt replaced mid-batch is another prompt)."""
    out: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(id(r.prompt), []).append(i)
    return out


@torch.inference_mode()
def predict_logits(base: ServedBase, rows: Sequence[PredictRow]) -> list[torch.Tensor]:
    """One forward of the frozen body for all rows, then each prompt's head on its rows: seq-cls
    logits [labels] or token-cls logits [tokens, labels] per row."""
    if not rows:
        return []
    batch = base.batch_inputs(rows, side="right")
    with base.lock:
        hidden = base.body(**batch.kwargs, use_cache=False).last_hidden_state
    out: list[torch.Tensor | None] = [None] * len(rows)
    for idx in groups(rows).values():
        for i, logits in zip(idx, rows[idx[0]].prompt.head.logits(hidden, batch, idx), strict=True):
            out[i] = logits
    return out


def predict(base: ServedBase, rows: Sequence[PredictRow]) -> list[dict]:
    """Results as `ptv2 predict` gives them: seq-cls {"label", "score", "scores"}; token-cls
    {"tokens", "tags", "entities"} (one tag per word, from its first sub-token)."""
    return [
        row.prompt.task.result(row, logits, row.prompt.labels)
        for row, logits in zip(rows, predict_logits(base, rows), strict=True)
    ]
