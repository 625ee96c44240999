"""DeepSpeed configs: a file from deepspeed_configs/ (or any path) + the job's overrides, with
every job-dependent value ("auto") filled from the job's settings — never duplicated by hand."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from ptv2.settings import TrainJob

# Package data: ptv2/deepspeed_configs is a link to the repository's top-level folder, and a
# copy of it inside an installed wheel.
CONFIG_DIR = Path(str(resources.files("ptv2") / "deepspeed_configs"))
# Filled from the job; an override may not set them (set the job's own field instead).
JOB_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "train_batch_size": "train.micro_batch_size × gradient_accumulation × workers",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
}


class DeepSpeedConfigError(ValueError):
    pass


def config_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if (CONFIG_DIR / name).is_file():
        return CONFIG_DIR / name
    known = ", ".join(sorted(f.name for f in CONFIG_DIR.glob("*.json")))
    raise DeepSpeedConfigError(f"deepspeed.config {name!r} is neither a file nor one of deepspeed_configs/ ({known})")


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        where = f"{path}{key}"
        if where in JOB_KEYS:
            raise DeepSpeedConfigError(f"deepspeed.overrides.{where} is set from the job: use {JOB_KEYS[where]}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _autos(d: dict, path: str = "") -> list[str]:
    found = []
    for k, v in d.items():
        if isinstance(v, dict):
            found += _autos(v, f"{path}{k}.")
        elif v == "auto":
            found.append(f"{path}{k}")
    return found


def build(job: TrainJob, world_size: int, dtype: str) -> dict:
    """The DeepSpeed config dict for `job` on `world_size` workers computing in `dtype`."""
    path = config_path(job.deepspeed.config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path} is not valid JSON: {e}") from e
    cfg = _merge(raw, job.deepspeed.overrides)
    t = job.train
    fill = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in fill.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for key, on in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    left = _autos(cfg)
    if left:
        raise DeepSpeedConfigError(f"{path}: no job value fills {', '.join(left)}")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
