"""Export a ptv2 prompt as a PEFT prefix-tuning adapter (`PeftModel.from_pretrained` loads it).

Our folded prefix already has PEFT's layout ([P, layers·2·token_dim], last dim ordered
(layer, key|value, kv_head, head_dim), token_dim = kv_heads × head_dim for GQA), so export is a
rename plus PEFT's `adapter_config.json`. Only causal-LM prompts are exported: PEFT 0.21's prefix
tuning cannot run BERT-family classifiers under transformers 5 (its `_prefix_tuning_forward`
looks for a `past_key_values` argument on the model or its backbone, which transformers 5 renamed,
and raises "Model does not support past key values which are required for prefix tuning."), and
a classification head has no place in a prefix-tuning adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ptv2.artifact import FOLDED, ArtifactError, atomic_dir, read_manifest
from ptv2.tasks import task_of


def export_peft(
    prompt_dir: str | Path, out_dir: str | Path, base_model: str | None = None, overwrite: bool = False
) -> Path:
    """Write a PEFT adapter folder for the (verified) prompt in `prompt_dir`."""
    manifest = read_manifest(prompt_dir)
    prompt = manifest["prompt"]
    if prompt["method"] != "ptv2" or prompt["length"] == 0:
        raise ArtifactError(f"only P-Tuning v2 prompts export to PEFT prefix tuning, this is {prompt['method']!r}")
    task = task_of(manifest["task"])
    if task.peft_task_type is None:
        raise ArtifactError(f"PEFT export supports causal-lm prompts, this one is for {manifest['task']}")
    g = manifest["base_model"]["geometry"]
    token_dim = g["num_kv_heads"] * g["head_dim"]
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task.peft_task_type,
        "base_model_name_or_path": base_model or manifest["base_model"]["name_or_path"],
        "num_virtual_tokens": prompt["length"],
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": g["num_kv_heads"],
        "num_layers": g["num_layers"],
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,  # the folded prefix: PEFT loads it into its plain embedding
        "inference_mode": True,
    }
    with safe_open(Path(prompt_dir) / FOLDED, "pt") as sf:
        weights = sf.get_tensor("prompt.embedding.weight")
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file({"prompt_embeddings": weights.contiguous()}, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)
