"""DeepSpeed configs: a file from deepspeed_configs/ (or any path) + the job's overrides, with
every job-dependent value ("auto") filled from the job's settings — never duplicated by hand.

`deepspeed.config: auto` (the default) picks the file on the workers from the numbers: the frozen
model's bytes (counted from its config, no weight loaded), the trainable state, an activation
estimate and the memory each rank has (`choose`)."""

from __future__ import annotations

import copy
import json
import math
import socket
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from ptv2 import storage
from ptv2.geometry import Geometry
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


AUTO = "auto"
# what `auto` picks from, cheapest step first
AUTO_CHOICES = ("replicated.json", "zero3.json", "zero3_offload.json")


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


def _refuse_job_keys(over: dict, path: str = "") -> None:
    for key, value in over.items():
        where = f"{path}{key}"
        if where in JOB_KEYS:
            raise DeepSpeedConfigError(f"deepspeed.overrides.{where} is set from the job: use {JOB_KEYS[where]}")
        if isinstance(value, dict):
            _refuse_job_keys(value, f"{where}.")


def _autos(d: dict, path: str = "") -> list[str]:
    found = []
    for k, v in d.items():
        if isinstance(v, dict):
            found += _autos(v, f"{path}{k}.")
        elif v == "auto":
            found.append(f"{path}{k}")
    return found


def build(
    job: TrainJob, world_size: int, dtype: str, choice: Choice | None = None, device_type: str | None = None
) -> dict:
    """The DeepSpeed config dict for `job` on `world_size` workers computing in `dtype` on
    `device_type` (default: cuda where torch sees a GPU, else cpu). With `deepspeed.config: auto`,
    `choice` (from `choose`) names the file and may add ZeRO-3 settings sized to the memory; the
    job's overrides are merged over both."""
    _refuse_job_keys(job.deepspeed.overrides)  # whatever the file
    name = job.deepspeed.config
    if name == AUTO:
        if choice is None:
            raise DeepSpeedConfigError("deepspeed.config auto is decided on the workers: build(..., choose(...))")
        name = choice.config
    path = config_path(name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path} is not valid JSON: {e}") from e
    if choice is not None and choice.zero3_settings:
        raw = _merge(raw, {"zero_optimization": choice.zero3_settings})
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
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage3_allgather_sequential") == "auto":
        if device_type is None:
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        # gloo on CPUs: each parameter gathered straight into its own buffer, not into one flat
        # buffer copied out again (a memory copy of every gathered layer, as dear as the transfer
        # there); NCCL on GPUs: one coalesced call per layer, DeepSpeed's default
        zero["stage3_allgather_sequential"] = device_type == "cpu"
    left = _autos(cfg)
    if left:
        raise DeepSpeedConfigError(f"{path}: no job value fills {', '.join(left)}")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def validate(job: TrainJob, world_size: int, dtype: str = "float32") -> None:
    """Check the job's DeepSpeed settings before any worker starts: the file and the overrides;
    with `auto`, the overrides against every file auto may pick."""
    if job.deepspeed.config != AUTO:
        build(job, world_size, dtype)
        return
    for name in AUTO_CHOICES:
        build(job, world_size, dtype, Choice(name, "validation", MemoryEstimate(0, 0, 0, 0, 0), 0, 0, world_size))


# ---- auto: which config, from the numbers -----------------------------------------------------
# Memory `auto` leaves free on a device: the allocator's fragmentation, the CUDA context and NCCL
# buffers, temporaries (logits, attention workspaces) the estimate does not itemise.
HEADROOM = 0.25
# Activations kept for the backward, in elements per token per layer: the layer input, norms,
# q/k/v and attention output (~8 × hidden) plus the MLP's four intermediate-sized tensors (gate, up,
# activation, product), with a fused attention kernel (no seq² scores). Checked against measured
# peaks in benchmarks/RESULTS.md (memory section). With activation checkpointing a layer keeps
# only its input (1 × hidden) and one layer at a time is recomputed whole.
ACT_HIDDEN, ACT_INTERMEDIATE = 8, 4
# fp32 master copy + Adam's two moments, per trainable value, besides its weight and gradient
OPTIMIZER_BYTES = 12


@dataclass(frozen=True)
class MemoryEstimate:
    """What one rank must hold to train a job, in bytes (see `estimate`)."""

    frozen: int  # the whole frozen model in the compute dtype
    largest_unit: int  # the largest block ZeRO-3 gathers at once: a layer or the embeddings
    trainable: int  # prompt + head: weight, gradient, fp32 master and Adam moments
    activations: int  # one micro-batch's forward and backward
    bytes_per_value: int  # of the compute dtype


@dataclass(frozen=True)
class Choice:
    """The config `auto` picked for a job, and the numbers behind it (the same on every rank)."""

    config: str  # a file of deepspeed_configs/
    reason: str
    estimate: MemoryEstimate
    device_bytes: int  # free memory per rank where the model computes (GPU, or RAM on a CPU)
    host_bytes: int  # host RAM per rank (where zero3_offload keeps the partitions)
    world_size: int
    zero3_settings: dict | None = None  # merged into the chosen ZeRO-3 file (before the overrides)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Choice:
        values = json.loads(text)
        return cls(**{**values, "estimate": MemoryEstimate(**values["estimate"])})

    def info(self) -> dict:
        """Flat values for the run's start line and MLflow tags."""

        def gib(n: int) -> float:
            return float(f"{n / 2**30:.4g}")

        sizes = {f"auto_{k}_gib": gib(v) for k, v in asdict(self.estimate).items() if k != "bytes_per_value"}
        return {
            "deepspeed_config": f"{self.config} (auto)",
            "auto_reason": self.reason,
            **sizes,
            "auto_device_gib": gib(self.device_bytes),
            "auto_host_gib": gib(self.host_bytes),
        }


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def choose(
    est: MemoryEstimate, device_bytes: int, host_bytes: int, world_size: int, device_type: str = "cuda"
) -> Choice:
    """The cheapest config whose working set fits each rank's memory, less HEADROOM:

    replicated (stage 0): the whole frozen model + trainable state + activations;
    zero3: this rank's partition + what ZeRO-3 keeps gathered + trainable state + activations,
      where "gathered" is everything fetched in the forward and kept for the backward as far as
      memory allows (stage3_max_live_parameters / stage3_max_reuse_distance sized to what is left,
      at least two of the largest units: the one computing and the one prefetched);
    zero3_offload: partitions in host memory, only the gathered units on the device. On a CPU
      there is nowhere else to offload to, so ZeRO-3 is the last step there.
    """
    usable = device_bytes * (1 - HEADROOM)
    fixed = est.trainable + est.activations
    replicated = est.frozen + fixed
    if replicated <= usable:
        reason = f"frozen {_gib(est.frozen)} + trainable {_gib(est.trainable)} + activations {_gib(est.activations)}"
        reason += f" = {_gib(replicated)} fits {_gib(usable)} ({1 - HEADROOM:.0%} of {_gib(device_bytes)} per rank)"
        return Choice("replicated.json", reason, est, device_bytes, host_bytes, world_size)
    partition = math.ceil(est.frozen / world_size)
    minimum_live = 2 * est.largest_unit
    zero3 = partition + minimum_live + fixed
    words = (
        f"replicated needs {_gib(replicated)} > {_gib(usable)} ({1 - HEADROOM:.0%} of {_gib(device_bytes)} per rank)"
    )
    if zero3 <= usable or device_type == "cpu":
        # keep as much gathered from the forward to the backward as the memory left allows
        live = max(minimum_live, min(usable - partition - fixed, est.frozen))
        live_values = int(live // max(est.bytes_per_value, 1))
        settings = {"stage3_max_live_parameters": live_values, "stage3_max_reuse_distance": live_values}
        fits = "fits" if zero3 <= usable else "does NOT fit either (CPU: nowhere to offload; expect swapping)"
        words += f"; ZeRO-3 partition {_gib(partition)} + 2 gathered units {_gib(minimum_live)} + trainable + "
        words += f"activations = {_gib(zero3)} {fits}; up to {_gib(live)} kept gathered for the backward"
        return Choice("zero3.json", words, est, device_bytes, host_bytes, world_size, settings)
    words += f"; ZeRO-3 needs {_gib(zero3)} (partition {_gib(partition)}) > {_gib(usable)}: partitions offloaded"
    words += f" to host memory ({_gib(partition)} of {_gib(host_bytes * (1 - HEADROOM))} usable per rank"
    words += ")" if partition <= host_bytes * (1 - HEADROOM) else ", NOT enough either)"
    if minimum_live + fixed > usable:  # what stays on the device does not fit either
        words += f"; even the 2 gathered units + trainable + activations ({_gib(minimum_live + fixed)}) do NOT fit:"
        words += " set train.gradient_checkpointing: true or a smaller train.micro_batch_size"
    return Choice("zero3_offload.json", words, est, device_bytes, host_bytes, world_size)


# In the job's storage: what `auto` decided at the job's first start.
CHOICE_FILE = "deepspeed-auto.json"


def decide(job: TrainJob, dtype: str, memory: tuple[int, int], world_size: int, device_type: str, rank: int) -> Choice:
    """What `auto` picks for `job`, decided once per job: at its first start from the numbers,
    recorded in the job's storage (rank 0 writes it), then read back at every restart and resume.
    Free memory differs from one start to the next, and a restart that chose another config would
    look for DeepSpeed checkpoint files of another layout (and fail at every retry)."""
    location = storage.join(job.storage, CHOICE_FILE)
    if storage.is_file(location):
        recorded = Choice.from_json(storage.read_bytes(location).decode())
        return replace(recorded, reason=f"decided at the job's first start: {recorded.reason}")
    choice = choose(estimate(job, dtype), *memory, world_size, device_type)
    if rank == 0:
        storage.write_bytes(location, choice.to_json().encode())
    return choice


def activation_bytes(
    config, micro_batch: int, tokens: int, bytes_per_value: int, checkpointing: bool, task: str
) -> int:
    """One micro-batch's activations kept for the backward (see ACT_HIDDEN), plus the causal-LM
    logits and their gradient in fp32 at every position (an upper bound: ptv2 computes them only
    where a label is)."""
    from ptv2.tasks import task_of  # torch, transformers: on the workers (`ptv2 validate` imports this module)

    g = Geometry.of(config)
    hidden = g.hidden_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layer = ACT_HIDDEN * hidden + ACT_INTERMEDIATE * inter
    per_token = (g.num_layers * hidden + layer) if checkpointing else g.num_layers * layer
    total = micro_batch * tokens * per_token * bytes_per_value
    if task_of(task).generates:  # logits over the vocabulary
        total += micro_batch * tokens * config.vocab_size * (bytes_per_value + 8)
    return int(total)


def estimate(job: TrainJob, dtype: str) -> MemoryEstimate:
    """Bytes per rank for `job` in `dtype`, from the model's config: the model is built on the
    meta device (no weight is read or allocated) to count its parameters exactly."""
    import torch
    from transformers import AutoConfig

    # the model and prompt code (transformers) load where the estimate is made, on the workers
    from ptv2.model import build_from_config, head_parameter_names
    from ptv2.prompt import count_prompt_parameters

    m = job.model
    config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    with torch.device("meta"):
        model = build_from_config(config, m.task, m.labels)
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    heads = set(head_parameter_names(model))
    counts = dict((n, p.numel()) for n, p in model.named_parameters())
    head = sum(v for n, v in counts.items() if n in heads)
    frozen = sum(counts.values()) - head
    units = [sum(p.numel() for p in mod.parameters()) for mod in _layers(model)]
    largest = max(units + [max(counts.values())])
    g = Geometry.of(model.config)
    trainable = count_prompt_parameters(job.prompt, g, folded=False) + head
    tokens = job.data.max_length + job.prompt.length
    acts = activation_bytes(
        model.config, job.train.micro_batch_size, tokens, width, job.train.gradient_checkpointing, m.task
    )
    return MemoryEstimate(frozen * width, largest * width, trainable * (2 * width + OPTIMIZER_BYTES), acts, width)


def _layers(model) -> list:
    """The model's repeated blocks (what zero3.json gathers as one unit each)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [mod for mod in model.modules() if isinstance(mod, GradientCheckpointingLayer)]


def memory_per_rank(device) -> tuple[int, int]:
    """(free bytes where this rank computes, host RAM this rank may use), each the minimum over
    all ranks so that every rank makes the same choice. Host RAM is what the OS reports
    available, shared by the ranks on the same host. Collective when a process group exists."""
    import psutil
    import torch

    from ptv2.distributed import all_gather  # torch: only on the workers (`ptv2 validate` imports this module)

    host = socket.gethostname()
    available = psutil.virtual_memory().available
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    everyone = all_gather((host, available, free))
    per_host: dict[str, int] = {}
    for h, _, _ in everyone:
        per_host[h] = per_host.get(h, 0) + 1
    host_bytes = min(a // per_host[h] for h, a, _ in everyone)
    device_bytes = host_bytes if free is None else min(f for _, _, f in everyone)
    return int(device_bytes), int(host_bytes)
