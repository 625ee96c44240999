"""The prompt artifact: what a training run produces and what inference loads.

    DIR/manifest.json         method, length, task, labels, geometry, base fingerprint, every
                              tensor's shape and dtype, sha256 of each file, library versions,
                              the data layout (prompt template, max length) inference reuses
    DIR/prompt.safetensors    folded prompt ("prompt.embedding.weight") + task head ("head.<param>"):
                              everything inference needs, no MLP
    DIR/trainable.safetensors raw trainable state ("prompt.<key>", "head.<param>"): resumes training

Loading verifies, in order: the manifest, each file's checksum, every tensor's shape and dtype,
the base model's geometry and fingerprint. Anything that differs is refused with a message that
says what differs. Writing goes to a temporary folder renamed into place, so a crash never
leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptv2 import fingerprint as fp
from ptv2.errors import ArtifactError
from ptv2.geometry import Geometry
from ptv2.settings import PromptConfig

if TYPE_CHECKING:
    from ptv2.model import PromptedModel

FORMAT = "ptv2-prompt/1"
MANIFEST = "manifest.json"
FOLDED = "prompt.safetensors"
RAW = "trainable.safetensors"
FILES = (FOLDED, RAW)  # every file an artifact holds besides the manifest, by bare name
PREFIX_LAYOUT = "[length, layers*2*kv_heads*head_dim], last dim ordered (layer, key|value, kv_head, head_dim)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("ptv2", "torch", "transformers", "safetensors", "deepspeed"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _describe(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir` that becomes `out_dir` only if the block
    completes; a refused, failed or interrupted write leaves `out_dir` as it was."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ArtifactError(f"{out} exists and is not empty; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is for sharing
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def collect_tensors(
    model: PromptedModel, state: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(folded, raw) tensors of `model`'s prompt and head, in float32 on CPU.

    `state` maps trainable parameter names ("prompt.…", "base.<head>") to full tensors, e.g. the
    fp32 master weights gathered from a DeepSpeed engine; by default the model's own are used.
    The fold runs on a CPU copy of the prompt module, so it works whatever the engine did."""
    if state is None:
        state = {n: p for n, p in model.named_parameters() if n.startswith("prompt.")}
        state.update({f"base.{n}": p for n, p in model.head_state().items()})
    folded: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    if model.prompt.length:
        from ptv2.prompt import make_prompt  # transformers: where a model exists anyway (not to read a manifest)

        copy = make_prompt(model.prompt_config, model.geometry)
        copy.load_state_dict(
            {k.removeprefix("prompt."): _cpu(v).float() for k, v in state.items() if k.startswith("prompt.")}
        )
        folded["prompt.embedding.weight"] = _cpu(copy.fold())
        raw.update({f"prompt.{k}": _cpu(v) for k, v in copy.state_dict().items()})
    for name in model.head_names:
        folded[f"head.{name}"] = raw[f"head.{name}"] = _cpu(state[f"base.{name}"]).float()
    return folded, raw


def save_prompt(
    model: PromptedModel,
    out_dir: str | Path,
    *,
    base_name_or_path: str,
    labels: Sequence[str] | None = None,
    base_fingerprint: dict | None = None,
    tensors: tuple[dict, dict] | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
    template: str | None = None,
    max_length: int | None = None,
) -> Path:
    """Write the artifact of `model` to `out_dir` atomically and return its path.

    `base_fingerprint` and `tensors` may be computed beforehand (collectively, under ZeRO-3);
    otherwise they are taken from `model` here. `template` (the job's data.prompt_template) and
    `max_length` (data.max_length) go to the manifest's "data": inference lays its inputs out and
    truncates them as training did."""
    _check_data_settings(Path(out_dir), {"prompt_template": template, "max_length": max_length})
    folded, raw = tensors if tensors is not None else collect_tensors(model)
    if base_fingerprint is None:
        base_fingerprint = fp.fingerprint(model.base, model.base.config, exclude=model.head_names)
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(folded, tmp / FOLDED, metadata={"format": FORMAT})
        save_file(raw, tmp / RAW, metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "task": model.task.name,
            "labels": list(labels) if labels else None,
            "prompt": model.prompt_config.to_dict(),
            "prefix_layout": PREFIX_LAYOUT if model.prompt_config.method == "ptv2" else "[length, hidden]",
            "head": list(model.head_names),
            "data": {"prompt_template": template, "max_length": max_length},
            "base_model": {
                "name_or_path": str(base_name_or_path),
                "architecture": type(model.base).__name__,
                "geometry": model.geometry.to_dict(),
                "fingerprint": base_fingerprint,
            },
            "tensors": {FOLDED: _describe(folded), RAW: _describe(raw)},
            "files": {name: sha256_file(tmp / name) for name in FILES},
            "versions": _versions(),
            **({"extra": extra} if extra else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def _check_data_settings(where: Path, data: object) -> dict:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: 'data' must be a mapping, not {type(data).__name__}")
    template, max_length = data.get("prompt_template"), data.get("max_length")
    if template is not None and not (isinstance(template, str) and "{prompt}" in template):
        raise ArtifactError(f"{where}: data.prompt_template must be a string containing {{prompt}}, got {template!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ArtifactError(f"{where}: data.max_length must be a positive integer, got {max_length!r}")
    return {"prompt_template": template, "max_length": max_length}


def data_settings(manifest: dict, where: str | Path) -> dict:
    """The manifest's checked data layout: {"prompt_template", "max_length"} (None where unset;
    artifacts written before the manifest had "data" have neither)."""
    return _check_data_settings(Path(where), manifest.get("data") or {})


def read_manifest(prompt_dir: str | Path) -> dict:
    """The manifest, after checking every file's checksum and every tensor's shape and dtype."""
    d = Path(prompt_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} is not a ptv2 prompt: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: format {got!r} is not {FORMAT!r}")
    files = _checked_files(path, manifest)
    for name, digest in files.items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(
                f"{f}: checksum mismatch (manifest {digest[:12]}…, file {actual[:12]}…): "
                "the file was changed or truncated"
            )
        with safe_open(f, "pt") as sf:
            found = {
                k: {"shape": list(sf.get_slice(k).get_shape()), "dtype": _st_dtype(sf.get_slice(k).get_dtype())}
                for k in sf.keys()
            }
        expected = manifest["tensors"][name]
        if found != expected:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise ArtifactError(f"{f}: tensors differ from the manifest at {', '.join(diff[:5])}")
    return manifest


def _checked_files(path: Path, manifest: dict) -> dict[str, str]:
    """`manifest["files"]`, refused unless it lists exactly the format's files by bare name with
    a sha256 each: a crafted name ("../../etc/passwd", an absolute path) must never be opened."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must map file names to sha256 digests")
    unknown = sorted(str(name) for name in files if name not in FILES)
    if unknown:
        raise ArtifactError(
            f"{path}: 'files' names {', '.join(repr(n) for n in unknown[:3])}; an artifact holds only "
            f"{' and '.join(FILES)} (bare names, in its own folder)"
        )
    missing = [name for name in FILES if name not in files]
    if missing:
        raise ArtifactError(f"{path}: 'files' lacks {', '.join(missing)} (every file must have a checksum)")
    bad = [n for n, digest in files.items() if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest))]
    if bad:
        raise ArtifactError(f"{path}: 'files' gives no sha256 hex digest for {', '.join(bad)}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or any(not isinstance(tensors.get(name), dict) for name in FILES):
        raise ArtifactError(f"{path}: 'tensors' must describe the tensors of {' and '.join(FILES)}")
    return files


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def _st_dtype(code: str) -> str:
    return _ST_DTYPES.get(code, code.lower())


def check_base(manifest: dict, base) -> None:
    """Refuse a base model whose geometry or fingerprint differs from the prompt's."""
    want = manifest["base_model"]
    head = manifest.get("head") or []
    try:
        geometry = Geometry.of(base.config).to_dict()
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    geo_diff = [
        f"{k}: prompt was trained with {want['geometry'][k]!r}, model has {geometry.get(k)!r}"
        for k in want["geometry"]
        if want["geometry"][k] != geometry.get(k)
    ]
    if geo_diff:
        raise ArtifactError(
            f"this prompt was trained on {want['name_or_path']}; the given model differs: " + "; ".join(geo_diff)
        )
    actual = fp.fingerprint(base, base.config, exclude=head)
    diff = fp.differences(want["fingerprint"], actual)
    if diff:
        raise ArtifactError(
            f"this prompt was trained on a different base model ({want['name_or_path']}): " + "; ".join(diff)
        )


def load_prompt(prompt_dir: str | Path, base, *, trainable: bool = False) -> PromptedModel:
    """Verify the artifact in `prompt_dir` against `base` and return the prompted model.

    `trainable=False` loads the folded prompt (inference); `True` the raw state (to go on
    training, MLP included)."""
    d = Path(prompt_dir)
    manifest = read_manifest(d)
    check_base(manifest, base)
    prompt_cfg = PromptConfig(**manifest["prompt"])
    if not trainable:  # the folded prompt is a plain table: no MLP, no dropout, and no init
        # forward through the base model (its tensors are loaded next)
        prompt_cfg = PromptConfig(method=prompt_cfg.method, length=prompt_cfg.length, init="normal")
    from ptv2.model import PromptedModel  # transformers: only where a model is built (not to read a manifest)

    model = PromptedModel(base, prompt_cfg, manifest["task"], trainable_head=manifest["head"])
    load_tensors(model, d / (RAW if trainable else FOLDED))
    # artifacts written before the manifest had "data" have neither
    data = _check_data_settings(d / MANIFEST, manifest.get("data") or {})
    model.prompt_template, model.max_length = data["prompt_template"], data["max_length"]
    return model


def load_tensors(model: PromptedModel, path: Path) -> None:
    """Copy the prompt and head tensors of an artifact file into `model` (strict)."""
    prompt_state, head_state = {}, {}
    with safe_open(path, "pt") as sf:
        for key in sf.keys():
            kind, name = key.split(".", 1)
            (prompt_state if kind == "prompt" else head_state)[name] = sf.get_tensor(key)
    if model.prompt.length:
        missing, unexpected = model.prompt.load_state_dict(prompt_state, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"{path}: prompt tensors do not fit (missing {missing}, unexpected {unexpected})")
    elif prompt_state:
        raise ArtifactError(f"{path} holds a prompt but the model was built without one")
    params = dict(model.base.named_parameters())
    if set(head_state) != set(model.head_names):
        raise ArtifactError(f"{path}: head tensors {sorted(head_state)} != expected {model.head_names}")
    with torch.no_grad():
        for name, value in head_state.items():
            if params[name].shape != value.shape:
                raise ArtifactError(
                    f"{path}: head {name} has shape {list(value.shape)}, model {list(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].dtype))
