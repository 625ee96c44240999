"""Many prompts on one frozen model: a bank of verified prompts and mixed-prompt batches.

A P-Tuning v2 prompt is nothing but its own keys/values at every layer (plus a task head), so rows
of different prompts can share one forward of the frozen model. In a batch, each row brings

    cache  [ pad … pad | its prefix keys/values ]            ptv2: P_row positions, 0 otherwise
    input  [ its soft prompt | its tokens ] (+ padding)       prompt-tuning: P_row embeddings

The cache holds every row's prefix left-padded to the batch's longest, so each real prefix sits
right before its row's input; the attention mask hides the padding. Positions follow training
(`PromptedModel._positions`): a row's inputs are numbered from its own prefix length, soft-prompt
positions first. Each row then gets its own task head: the body runs once, the heads (a few
thousand values each) are applied per prompt with `torch.func.functional_call` on the module
transformers itself builds for that task. The result equals running each prompt alone (fp32
logits within float rounding: tests/test_serving.py).

`ServedBase` is the frozen model (body, LM head, tokenizer); `PromptBank` the verified prompts
for it (least recently used out past a count or byte budget); `predict` and `generate` run
mixed batches. No Ray or MLflow here: launcher/serve.py puts this behind Ray Serve.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ptv2 import fingerprint as fp
from ptv2.artifact import FOLDED, ArtifactError, check_base, data_settings, read_manifest
from ptv2.errors import first_line
from ptv2.infer import _pad_id, apply_template, label_scores, word_tags
from ptv2.model import AUTO_CLASSES, HEAD_MODULES, TASKS
from ptv2.prefix import Geometry, PrefixEncoder, PromptConfig, build_prompt_module

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ServingError(ValueError):
    """A request the served model cannot answer as asked (the caller's mistake)."""


class UnknownPrompt(ServingError):
    def __init__(self, name: str, loaded: Sequence[str]) -> None:
        self.name, self.loaded = name, sorted(loaded)
        shown = ", ".join(self.loaded[:50]) + (" …" if len(self.loaded) > 50 else "")
        super().__init__(f"no prompt {name!r} is loaded; loaded: {shown or 'none'}")


class WrongTask(ServingError):
    pass


class BadInput(ServingError):
    pass


class InputTooLong(BadInput):
    pass


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
        self.pad_id = _pad_id(tokenizer)
        self.lm_head = model.get_output_embeddings() if self.geometry.kind == "decoder" else None
        params = inspect.signature(self.body.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 renamed it
        # Names as the task classes (what prompts are trained and fingerprinted on) call them:
        # a bare body's parameters carry its base_model_prefix there ("bert.", "model.").
        named = model.named_parameters(remove_duplicate=False)
        if model.base_model is model:
            self._params = {f"{model.base_model_prefix}.{n}": p for n, p in named}
        else:
            self._params = dict(named)
        self._heads: dict[tuple[str, int], _HeadTemplate] = {}
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
        auto = AutoModelForCausalLM if geometry.kind == "decoder" else AutoModel
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

    def head_template(self, task: str, num_labels: int) -> _HeadTemplate:
        """The task's head module for `num_labels` as transformers builds it, on the meta device:
        no weights of its own; each prompt gets a copy holding its weights (`_own`)."""
        with self._heads_lock:
            if (task, num_labels) not in self._heads:
                config = copy.deepcopy(self.config)
                config.num_labels = num_labels
                with torch.device("meta"):
                    model = AUTO_CLASSES[task].from_config(config)
                name = next((n for n in HEAD_MODULES if isinstance(getattr(model, n, None), nn.Module)), None)
                if name is None:
                    raise ArtifactError(f"{type(model).__name__} has no head module among {', '.join(HEAD_MODULES)}")
                uses_pooler = getattr(model.base_model, "pooler", None) is not None
                self._heads[task, num_labels] = _HeadTemplate(name, getattr(model, name), uses_pooler)
            return self._heads[task, num_labels]

    # ---- one batch ---------------------------------------------------------------------------------
    def batch_inputs(self, rows: Sequence[_Row], side: str) -> tuple[dict, Layout]:
        """The body's keyword arguments for `rows` (see the module docstring) and where each
        row's inputs sit. `side`: where the input region is padded ("left" to generate)."""
        g, dev = self.geometry, self.device
        kv_lens = [r.prompt.piece.kv_length for r in rows]
        soft = [r.prompt.piece.input_length for r in rows]
        lengths = [s + len(r.ids) for s, r in zip(soft, rows, strict=True)]
        prefix, width, batch = max(kv_lens), max(lengths), len(rows)
        starts = [0 if side == "right" else width - n for n in lengths]
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, prefix + width, dtype=torch.long)
        types = torch.zeros(batch, width, dtype=torch.long) if any(r.token_types for r in rows) else None
        for i, r in enumerate(rows):
            first = starts[i] + soft[i]
            ids[i, first : starts[i] + lengths[i]] = torch.tensor(r.ids)
            mask[i, prefix - kv_lens[i] : prefix] = 1
            mask[i, prefix + starts[i] : prefix + starts[i] + lengths[i]] = 1
            if types is not None and r.token_types:
                types[i, first : starts[i] + lengths[i]] = torch.tensor(r.token_types)
        ids, mask = ids.to(dev), mask.to(dev)
        embeds = self.body.get_input_embeddings()(ids)
        for i, r in enumerate(rows):
            if soft[i]:
                embeds[i, starts[i] : starts[i] + soft[i]] = r.prompt.piece.input_embeds().to(embeds.dtype)
        offsets = torch.tensor(kv_lens, device=dev)[:, None] + g.position_offset
        positions = (mask[:, prefix:].cumsum(-1) - 1).clamp(min=0) + offsets
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        if types is not None:
            kwargs["token_type_ids"] = types.to(dev)
        kwargs[self.cache_kwarg] = self._prefix_cache(rows, prefix)
        return kwargs, Layout(prefix, width, starts, soft, lengths)

    def _prefix_cache(self, rows: Sequence[_Row], prefix: int) -> DynamicCache:
        g = self.geometry
        # BERT-family encoders build their own cache layers from the data (config=None)
        config = self.config if g.kind == "decoder" else None
        if prefix == 0:
            return DynamicCache(config=config)
        buf = torch.zeros(
            g.num_layers, 2, len(rows), g.num_kv_heads, prefix, g.head_dim, dtype=self.dtype, device=self.device
        )
        for i, r in enumerate(rows):
            r.prompt.piece.write_prefix(buf[:, :, i])
        return DynamicCache([(buf[n, 0], buf[n, 1]) for n in range(g.num_layers)], config=config)


@dataclass
class Layout:
    """Where each row of a batch sits: `prefix` cache positions, then an input region of `width`
    where row i's soft prompt (`soft[i]` positions) and tokens start at `starts[i]`."""

    prefix: int
    width: int
    starts: list[int]
    soft: list[int]
    lengths: list[int]

    def tokens(self, i: int) -> slice:
        return slice(self.starts[i] + self.soft[i], self.starts[i] + self.lengths[i])


# ---- what each prompting method contributes to a row ---------------------------------------------
class DeepPrefix:
    """P-Tuning v2: keys/values [layers, 2, kv_heads, P, head_dim] in front of every layer."""

    method = "ptv2"

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.kv_length, self.input_length = kv.shape[3], 0

    def write_prefix(self, buf: torch.Tensor) -> None:
        """Into one row of a batch's cache buffer [layers, 2, kv_heads, prefix, head_dim]: at the
        end, next to the row's inputs."""
        buf[:, :, :, buf.shape[3] - self.kv_length :] = self.kv

    def input_embeds(self) -> torch.Tensor:
        raise AssertionError("a deep prefix has no input positions")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"kv": self.kv}

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class SoftPrompt:
    """Prompt tuning (Lester et al.): P input embeddings [P, hidden] before the tokens."""

    method = "prompt-tuning"

    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds
        self.kv_length, self.input_length = 0, embeds.shape[0]

    def write_prefix(self, buf: torch.Tensor) -> None:
        pass

    def input_embeds(self) -> torch.Tensor:
        return self.embeds

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeds": self.embeds}

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class NoPrompt:
    """Length 0 (a linear probe: head only)."""

    method = "none"
    kv_length = input_length = nbytes = 0

    def write_prefix(self, buf: torch.Tensor) -> None:
        pass

    def input_embeds(self) -> torch.Tensor:
        raise AssertionError("no prompt has no input positions")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}


def _piece(config: PromptConfig, weight: torch.Tensor | None, base: ServedBase) -> DeepPrefix | SoftPrompt | NoPrompt:
    """The folded prompt table as the method uses it, through the same modules as training."""
    module = build_prompt_module(PromptConfig(method=config.method, length=config.length, init="normal"), base.geometry)
    if module is None:
        return NoPrompt()
    module.load_state_dict({"embedding.weight": weight})
    with torch.no_grad():
        out = module.eval()().to(device=base.device, dtype=base.dtype).contiguous()
    return DeepPrefix(out) if isinstance(module, PrefixEncoder) else SoftPrompt(out)


# ---- task heads --------------------------------------------------------------------------------------
def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _own(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A prompt's own copy of a head module holding `tensors` (all of them: strict). Never the
    shared module with weights swapped in for a call (`torch.func.functional_call` does that, in
    place): a batch runs heads outside the model's lock while another thread loads a prompt."""
    module = copy.deepcopy(template)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().requires_grad_(False)


class SequenceHead:
    """seq-cls: one label per input, from the first input position (encoders: BERT's pooler,
    RoBERTa's head read it) or the last real token (decoders, as PromptedModel)."""

    task = "seq-cls"

    def __init__(self, base: ServedBase, tensors: dict[str, torch.Tensor], num_labels: int) -> None:
        t = base.head_template(self.task, num_labels)
        self.name = t.name  # the head module's name in the task class ("classifier", "score")
        self.decoder = base.geometry.kind == "decoder"
        self.module = _own(t.module, _split(tensors, f"{t.name}."))
        pooler_prefix = f"{base.model.base_model_prefix}.pooler."
        pooler = _split(tensors, pooler_prefix)
        self.pooler = None
        if t.uses_pooler:
            shared = getattr(base.body, "pooler", None)
            if shared is None:
                raise ArtifactError(f"{self.task} on {base.geometry.model_type} needs the pooler the served base lacks")
            # a pooler the prompt trained (its checkpoint had none) is the prompt's own; the base's
            # is only read
            self.pooler = _own(shared, pooler) if pooler else shared
        used = {f"{t.name}.{k}" for k in _split(tensors, f"{t.name}.")} | {pooler_prefix + k for k in pooler}
        _refuse_other_tensors(tensors, used, self.task)

    def logits(self, hidden: torch.Tensor, layout: Layout, rows: list[int]) -> list[torch.Tensor]:
        pos = [layout.starts[i] + (layout.lengths[i] - 1 if self.decoder else 0) for i in rows]
        x = hidden[rows, pos]  # [n, hidden]
        if self.pooler is not None:  # BERT: pooler (reads position 0 of a sequence) -> classifier
            out = self.module(self.pooler(x[:, None]))
        elif not self.decoder:  # RoBERTa's classification head reads position 0 itself
            out = self.module(x[:, None])
        else:
            out = self.module(x)
        return list(out)


class TokenHead:
    """token-cls: one label per token."""

    task = "token-cls"

    def __init__(self, base: ServedBase, tensors: dict[str, torch.Tensor], num_labels: int) -> None:
        t = base.head_template(self.task, num_labels)
        self.name = t.name
        own = _split(tensors, f"{t.name}.")
        self.module = _own(t.module, own)
        _refuse_other_tensors(tensors, {f"{t.name}.{k}" for k in own}, self.task)

    def logits(self, hidden: torch.Tensor, layout: Layout, rows: list[int]) -> list[torch.Tensor]:
        spans = [hidden[i, layout.tokens(i)] for i in rows]
        out = self.module(torch.cat(spans))
        return list(out.split([len(s) for s in spans]))


def _refuse_other_tensors(tensors: dict, used: set[str], task: str) -> None:
    other = sorted(set(tensors) - used)
    if other:
        raise ArtifactError(
            f"this {task} prompt also trained {', '.join(other[:3])}: parts of the base model that every "
            "prompt of a served base shares (serve it with ptv2 predict instead)"
        )


def _head(
    task: str, base: ServedBase, tensors: dict[str, torch.Tensor], num_labels: int
) -> SequenceHead | TokenHead | None:
    if task == "causal-lm":
        if base.lm_head is None:
            raise ArtifactError("a causal-lm prompt needs a decoder with an LM head; the served base has none")
        _refuse_other_tensors(tensors, set(), task)
        return None
    heads = {"seq-cls": SequenceHead, "token-cls": TokenHead}
    if task not in heads:
        raise ArtifactError(f"task {task!r} is not one of {', '.join(TASKS)}")
    try:
        return heads[task](base, tensors, num_labels)
    except RuntimeError as e:  # load_state_dict: tensors of other shapes or names
        raise ArtifactError(f"the {task} head does not fit this base: {first_line(e)}") from e


# ---- prompts and the bank ---------------------------------------------------------------------------
@dataclass(eq=False)
class LoadedPrompt:
    """A verified prompt, ready for batches on one served base."""

    name: str
    task: str
    labels: list[str] | None
    piece: DeepPrefix | SoftPrompt | NoPrompt
    head: SequenceHead | TokenHead | None
    template: str | None
    max_length: int | None
    path: Path
    manifest: dict
    source: str | None = None
    nbytes: int = 0

    @property
    def length(self) -> int:
        return self.piece.kv_length + self.piece.input_length

    @classmethod
    def load(cls, base: ServedBase, name: str, path: str | Path, source: str | None = None) -> LoadedPrompt:
        """Verify (checksums, shapes, base fingerprint) and load the folded prompt in `path`."""
        check_name(name)
        path = Path(path)
        manifest = read_manifest(path)
        base.verify(manifest, name)
        task = manifest.get("task")
        try:
            config = PromptConfig(**manifest["prompt"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: the manifest's prompt settings are not valid: {e}") from e
        labels = manifest.get("labels")
        with safe_open(path / FOLDED, "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        weight = tensors.pop("prompt.embedding.weight", None)
        if (weight is None) != (config.length == 0):
            raise ArtifactError(f"{path / FOLDED}: the prompt table does not match length {config.length}")
        heads = {k.removeprefix("head."): v.to(device=base.device, dtype=base.dtype) for k, v in tensors.items()}
        piece = _piece(config, weight, base)
        if task != "causal-lm" and (not isinstance(labels, list) or len(labels) < 2):
            raise ArtifactError(f"{path}: a {task} prompt needs its label names in the manifest")
        head = _head(task, base, heads, len(labels or []))
        data = data_settings(manifest, path)
        prompt = cls(
            name=name,
            task=task,
            labels=list(labels) if labels else None,
            piece=piece,
            head=head,
            template=data["prompt_template"],
            max_length=data["max_length"],
            path=path,
            manifest=manifest,
            source=source,
            nbytes=piece.nbytes + sum(v.numel() * v.element_size() for v in heads.values()),
        )
        prompt._check_head(base)
        return prompt

    def _check_head(self, base: ServedBase) -> None:
        """Run the head once on zeros: its output must have one score per label."""
        if self.head is None:
            return
        layout = Layout(0, 1, [0], [0], [1])
        with torch.inference_mode():
            zeros = torch.zeros(1, 1, base.geometry.hidden_size, device=base.device, dtype=base.dtype)
            out = self.head.logits(zeros, layout, [0])
        if out[0].shape[-1] != len(self.labels):
            raise ArtifactError(f"{self.path}: the head gives {out[0].shape[-1]} scores for {len(self.labels)} labels")

    def weights_sha256(self) -> str:
        """A digest of the weights this prompt serves with now, as held in memory (its prompt and
        its head's own modules): equal to a fresh load's unless something wrote into them."""
        held = {f"prompt.{k}": v for k, v in self.piece.tensors().items()}
        if self.head is not None:
            held.update({f"head.{k}": v for k, v in self.head.module.state_dict().items()})
            pooler = getattr(self.head, "pooler", None)
            if pooler is not None:
                held.update({f"pooler.{k}": v for k, v in pooler.state_dict().items()})
        h = hashlib.sha256()
        for name, tensor in sorted(held.items()):
            h.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
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
class _Row:
    """One input of a batch, tokenized: the prompt, token ids (and token types)."""

    prompt: LoadedPrompt
    ids: list[int]
    token_types: list[int] | None = None


@dataclass
class PredictRow(_Row):
    words: list[str] | None = None  # token-cls: the words tagged
    word_ids: list[int | None] | None = None


@dataclass
class GenerateRow(_Row):
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


def _capacity(base: ServedBase, prompt: LoadedPrompt, cap: int | None) -> int:
    room = (base.geometry.max_positions or 1 << 30) - prompt.length
    return min(room, cap) if cap else room


def _need_task(prompt: LoadedPrompt, tasks: tuple[str, ...], what: str) -> None:
    if prompt.task not in tasks:
        raise WrongTask(f"prompt {prompt.name!r} is a {prompt.task} prompt; {what} needs {' or '.join(tasks)}")


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
    _need_task(prompt, ("seq-cls", "token-cls"), "predict")
    words = None
    if prompt.task == "token-cls":
        words = text.split() if isinstance(text, str) else list(text)
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise BadInput("empty input: token-cls needs words to tag (a text, or a list of non-empty words)")
    elif not isinstance(text, str):
        raise BadInput("seq-cls classifies a text, not a list of words")
    elif not text.strip():
        raise BadInput("empty input: seq-cls needs a non-empty text")
    capacity = _capacity(base, prompt, max_input_tokens)
    limit = min(prompt.max_length or capacity, capacity)
    kwargs = {"is_split_into_words": True} if words is not None else {}
    source = [words] if words is not None else [text]
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
    _need_task(prompt, ("causal-lm",), "generate")
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
    capacity = _capacity(base, prompt, max_input_tokens)
    if len(ids) + max_new_tokens > capacity:
        raise InputTooLong(
            f"input is {len(ids)} tokens and {max_new_tokens} more were asked for; prompt {prompt.name!r} "
            f"leaves room for {capacity} in all"
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


# ---- mixed batches -------------------------------------------------------------------------------
def _groups(rows: Sequence[_Row]) -> dict[int, list[int]]:
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
    kwargs, layout = base.batch_inputs(rows, side="right")
    with base.lock:
        hidden = base.body(**kwargs, use_cache=False).last_hidden_state
    out: list[torch.Tensor | None] = [None] * len(rows)
    for idx in _groups(rows).values():
        for i, logits in zip(idx, rows[idx[0]].prompt.head.logits(hidden, layout, idx), strict=True):
            out[i] = logits
    return out


_BIO = re.compile(r"O|[BIES]-.+")


def _entities(words: list[str], tags: list[str], labels: list[str]) -> list[dict] | None:
    """Entity spans of BIO-style tags (seqeval's reading); None when the labels are not BIO."""
    if not all(_BIO.fullmatch(label) for label in labels):
        return None
    from seqeval.metrics.sequence_labeling import get_entities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spans = get_entities(tags)
    return [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])} for t, s, e in spans]


def predict(base: ServedBase, rows: Sequence[PredictRow]) -> list[dict]:
    """Results as `ptv2 predict` gives them: seq-cls {"label", "score", "scores"}; token-cls
    {"tokens", "tags", "entities"} (one tag per word, from its first sub-token)."""
    results = []
    for row, logits in zip(rows, predict_logits(base, rows), strict=True):
        names = row.prompt.labels
        if row.prompt.task == "seq-cls":
            results.append(label_scores(logits.float().softmax(-1).cpu(), names))
        else:
            best = logits.argmax(-1).cpu().tolist()
            tags = word_tags(row.word_ids, best, names, len(row.words))
            results.append({"tokens": row.words, "tags": tags, "entities": _entities(row.words, tags, names)})
    return results


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


@torch.inference_mode()
def generate(base: ServedBase, rows: Sequence[GenerateRow]) -> list[Generation]:
    """Continue every row in one batch with a KV cache: a prefill of all rows (each with its own
    prefix or soft prompt), then one token per row per step. A row leaves the batch when it
    ends (end of sequence, a stop string, its max_new_tokens); the text excludes the stop."""
    if not rows:
        return []
    if base.lm_head is None:
        raise WrongTask("the served base has no LM head to generate with")
    eos = _eos_ids(base)
    samplers = [_Sampler(r, base.device) for r in rows]
    new: list[list[int]] = [[] for _ in rows]
    done: list[Generation | None] = [None] * len(rows)
    kwargs, _ = base.batch_inputs(rows, side="left")  # every row's last input at the end
    cache, mask = kwargs[base.cache_kwarg], kwargs["attention_mask"]
    position = kwargs["position_ids"][:, -1] + 1
    embed = base.body.get_input_embeddings()
    active = list(range(len(rows)))
    step_kwargs = kwargs
    with base.lock:
        while active:
            hidden = base.body(**step_kwargs, use_cache=True).last_hidden_state[:, -1]
            logits = base.lm_head(hidden).float()
            keep, tokens = [], []
            for j, i in enumerate(active):
                r = rows[i]
                try:
                    token = samplers[i](logits[j])
                except Exception as e:  # this row alone fails: the batch goes on without it
                    done[i] = Generation("", "error", len(r.ids), new[i], error=first_line(e))
                    continue
                reason = "stop" if token in eos else None
                if reason is None:
                    new[i].append(token)
                text = base.decode(new[i]) if r.stop or reason else None
                cut = _stopped(text, r.stop) if r.stop else None
                if cut is not None:
                    reason, text = "stop", text[:cut]
                elif reason is None and len(new[i]) >= r.max_new_tokens:
                    reason = "length"
                if reason is None:
                    keep.append(j)
                    tokens.append(token)
                else:
                    text = base.decode(new[i]) if text is None else text
                    done[i] = Generation(text, reason, len(r.ids), new[i])
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch (and its cache)
                index = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(index)
                mask, position = mask[index], position[index]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            ids = torch.tensor(tokens, device=mask.device)[:, None]
            step_kwargs = {
                "inputs_embeds": embed(ids),
                "attention_mask": mask,
                "position_ids": position[:, None],
                base.cache_kwarg: cache,
            }
            position = position + 1
    return done
