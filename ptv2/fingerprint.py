"""A cheap, dtype-independent fingerprint of a frozen base model.

A prompt is only meaningful on the exact model it was trained on. Hashing every weight of a
multi-billion-parameter model would take minutes, so the fingerprint keeps:
- the architecture-defining config fields, exactly;
- for every frozen tensor its name and shape, plus a few values at fixed, evenly spaced flat
  positions, rounded to bfloat16 (so a bf16-trained prompt still matches the same model loaded
  in fp32), and a sha256 over all of that.
Verification compares the hash first and, where it differs, says which field or tensor does.
Under DeepSpeed ZeRO-3 the parameters are partitioned: each one is gathered in turn, which is a
collective call, so every rank must compute the fingerprint together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

from ptv2.distributed import gathered

SAMPLES_PER_TENSOR = 8
# Config fields that define what the weights mean (label names and dtype do not).
CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "hidden_act",
    "activation_function",
    "type_vocab_size",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "sliding_window",
)
# Relative tolerance when comparing sampled values: covers bf16 rounding, not a different model.
RTOL = 1.0 / 64


def _config_fields(config) -> dict:
    d = config.to_dict()
    return {k: d[k] for k in CONFIG_FIELDS if k in d and d[k] is not None}


def _sample(param: torch.nn.Parameter) -> list[float]:
    with gathered([param]):
        flat = param.data.reshape(-1)
        n = flat.numel()
        k = min(SAMPLES_PER_TENSOR, n)
        idx = (torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)).to(flat.device)
        values = flat[idx].detach().to(torch.float32).to(torch.bfloat16).to(torch.float32)
        return [float(v) for v in values.cpu()]


def _shape(param: torch.nn.Parameter) -> list[int]:
    return list(getattr(param, "ds_shape", None) or param.shape)


def fingerprint(model: torch.nn.Module, config, exclude: Iterable[str] = ()) -> dict:
    """Fingerprint of `model` (a transformers model) without the parameters in `exclude`
    (the task head, which the prompt artifact carries itself)."""
    exclude = set(exclude)
    tensors = {}
    for name, param in model.named_parameters():
        if name in exclude:
            continue
        tensors[name] = {"shape": _shape(param), "sample": _sample(param)}
    cfg = _config_fields(config)
    return {
        "config": cfg,
        "config_sha256": _sha(cfg),
        "weights_sha256": _sha(tensors),
        "tensors": tensors,
    }


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def differences(expected: dict, actual: dict, limit: int = 5) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match."""
    out: list[str] = []
    ec, ac = expected["config"], actual["config"]
    for key in sorted(set(ec) | set(ac)):
        if ec.get(key) != ac.get(key):
            out.append(f"config {key}: prompt was trained on {ec.get(key)!r}, model has {ac.get(key)!r}")
    if out or expected["weights_sha256"] == actual["weights_sha256"]:
        return out[:limit]
    et, at = expected["tensors"], actual["tensors"]
    missing = sorted(set(et) - set(at))
    extra = sorted(set(at) - set(et))
    if missing:
        out.append(f"model lacks {len(missing)} trained-on tensor(s), e.g. {missing[0]}")
    if extra:
        out.append(f"model has {len(extra)} tensor(s) the prompt's base lacked, e.g. {extra[0]}")
    for name in sorted(set(et) & set(at)):
        if et[name]["shape"] != at[name]["shape"]:
            out.append(f"tensor {name}: shape {et[name]['shape']} expected, found {at[name]['shape']}")
        else:
            a = torch.tensor(et[name]["sample"])
            b = torch.tensor(at[name]["sample"])
            if not torch.allclose(a, b, rtol=RTOL, atol=1e-6):
                diff = float((a - b).abs().max())
                out.append(f"tensor {name}: weights differ (max sampled difference {diff:.3g})")
        if len(out) >= limit:
            break
    return out[:limit]
