"""Loading a frozen model under ZeRO-3 without it ever being whole on one rank.

transformers' own ZeRO-3 path builds the model already partitioned (`zero.Init`), then has rank
0 read every checkpoint file and hand each layer's weights out through a gather: rank 0 maps
the whole checkpoint (a 16 GB model: 16 GB of pages on one process) while every rank holds its
partition. Here every rank builds the partitioned model the same way (transformers' own init
context), then reads from the safetensors files only the rows of each weight that its own
partition holds; no weight is gathered, nothing is broadcast, and each file is closed before
the next one is opened. Parameters the checkpoint lacks (a new task head) are initialised as
transformers does. Checkpoints this cannot read exactly (no safetensors, other key names,
quantized or NVMe-offloaded partitions) go through transformers' path unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


def safetensors_files(name_or_path: str | Path) -> list[Path] | None:
    """The checkpoint's safetensors files (sharded or single), or None."""
    folder = Path(name_or_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def supported(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    nvme = zero.get("offload_param", {}).get("device") == "nvme"
    return zero.get("stage") == 3 and not nvme and not zero.get("zero_quantized_nontrainable_weights", False)


def _load_partition(param: torch.nn.Parameter, rows) -> None:
    """Copy into `param`'s ZeRO-3 partition its range of the flattened weight, reading only the
    rows of the safetensors slice `rows` that the range covers."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    shape = list(rows.get_shape())
    expected = list(getattr(param, "ds_shape", None) or param.shape)
    if shape != expected:  # a flat copy would fit any tensor with enough values: refuse, as transformers does
        raise ValueError(f"the checkpoint's tensor has shape {shape}, the model's parameter {expected}")
    if getattr(param, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:  # whole on every rank
        param.data.copy_(rows[:].reshape(param.data.shape).to(param.dtype))
        return
    size = param.ds_tensor.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    end = min(start + size, param.ds_numel)
    if start >= end:  # this rank's partition is all padding
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, -(-end // row)
    flat = rows[first:last].reshape(-1)[start - first * row : end - first * row]
    param.ds_tensor.narrow(0, 0, end - start).copy_(flat.to(param.ds_tensor.dtype))


def load_zero3(
    cls, name_or_path: str | Path, config, dtype: torch.dtype, heads: tuple[str, ...] = ()
) -> tuple[object, list[str]] | None:
    """(model, names of parameters the checkpoint lacked) for `cls` (an Auto class's model class)
    built partitioned and filled rank by rank; None where transformers must load it instead (only
    the task head modules `heads` may be missing). Collective: every rank calls it (while a
    HfDeepSpeedConfig of a ZeRO-3 config is alive)."""
    import deepspeed
    from safetensors import safe_open
    from transformers.utils import ContextManagers

    files = safetensors_files(name_or_path)
    if files is None:
        return None
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):  # what from_pretrained uses
        model = cls(config)
    model.tie_weights()  # tied weights (an LM head that is the embedding) are one parameter from here
    prefix = model.base_model_prefix
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    keys = {}  # checkpoint key -> (file, parameter or buffer name); other keys are ignored, as transformers does
    for f in files:
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                for name in (key, f"{prefix}.{key}"):
                    if name in params or name in buffers:
                        keys[key] = (f, name)
                        break
    found = {name for _, name in keys.values()}
    missing = sorted(n for n in params if n not in found)
    if any(n.split(".", 1)[0] not in heads for n in missing):
        return None  # weights under names this loader does not map: transformers converts them
    for f in files:  # one file open at a time; its pages go when it closes
        with safe_open(f, "pt") as sf, torch.no_grad():
            for key, (where, name) in keys.items():
                if where != f:
                    continue
                if name in params:
                    try:
                        _load_partition(params[name], sf.get_slice(key))
                    except ValueError as e:
                        raise ValueError(f"{f}: {key}: {e}") from e
                else:  # a buffer the checkpoint carries: small, whole on every rank
                    buffers[name].copy_(sf.get_tensor(key).to(buffers[name].dtype))
    for module_name in sorted({n.rsplit(".", 1)[0] for n in missing}):  # a new head starts as transformers starts it
        module = model.get_submodule(module_name)
        with (
            deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0),
            torch.no_grad(),
        ):
            if dist.get_rank() == 0:
                model._initialize_weights(module)
    model.eval()
    return model, missing
