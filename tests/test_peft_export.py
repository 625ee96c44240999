"""The PEFT export is proven by PEFT itself: it loads the adapter and gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from ptv2.artifact import ArtifactError, save_prompt
from ptv2.model import PromptedModel
from ptv2.peft_export import export_peft
from ptv2.settings import PromptConfig
from tests.helpers import randomize_prompt
from tests.tiny import tiny_model

peft = pytest.importorskip("peft")


def _check_with_peft(model: PromptedModel, base_again, tmp_path, ids):
    with torch.no_grad():
        ours = model(ids).logits
    prompt = save_prompt(model, tmp_path / "prompt", base_name_or_path="base")
    adapter = export_peft(prompt, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == model.prompt_length
    peft_model = peft.PeftModel.from_pretrained(base_again, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("projection", [None, 16])
def test_peft_loads_our_export_with_matching_logits(tmp_path, arch, projection):
    model = PromptedModel(tiny_model(arch), PromptConfig(length=5, projection=projection), "causal-lm")
    randomize_prompt(model, scale=0.5)
    _check_with_peft(model.eval(), tiny_model(arch), tmp_path, torch.randint(3, 96, (2, 9)))


@pytest.mark.slow
def test_peft_export_on_real_smollm2(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PromptedModel(base, PromptConfig(length=4), "causal-lm")
    randomize_prompt(model, scale=0.5)
    again = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    _check_with_peft(model.eval(), again, tmp_path, torch.randint(3, 1000, (1, 12)))


def test_classifier_and_prompt_tuning_exports_are_refused(tmp_path):
    m = PromptedModel(tiny_model("bert", "seq-cls", ["a", "b"]), PromptConfig(length=3), "seq-cls")
    p = save_prompt(m, tmp_path / "cls", base_name_or_path="x")
    with pytest.raises(ArtifactError, match="supports causal-lm prompts, this one is for seq-cls"):
        export_peft(p, tmp_path / "out")
    m = PromptedModel(tiny_model("llama"), PromptConfig(method="prompt-tuning", length=3), "causal-lm")
    p = save_prompt(m, tmp_path / "pt", base_name_or_path="x")
    with pytest.raises(ArtifactError, match="only P-Tuning v2 prompts"):
        export_peft(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()
