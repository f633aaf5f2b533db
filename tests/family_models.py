"""A tiny family checkpoint loaded as a run loads it, with LoRA adapters that matter, for tests that compare two
paths of the same batch exactly (grouped vs one image pass per row, cached features vs pixels)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import LoraArguments, ModelArguments
from captioning.families import detect_family
from captioning.modeling import load_model
from collators import build_layout


def lora_family_model(path):
    """(model, family, processor, layout) of the checkpoint at ``path``: LoRA without dropout, in eval mode, its B
    matrices drawn (seed 0) instead of zero; the family's prompt, or "a photo of " where it has none."""
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    torch.manual_seed(0)
    model = load_model(ModelArguments(model_name_or_path=str(path)), LoraArguments(lora_dropout=0.0), config, family)
    model.eval()  # no dropout anywhere: the two paths must agree exactly, not in expectation
    for name, parameter in model.named_parameters():  # LoRA B starts at zero; make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    processor = AutoProcessor.from_pretrained(path)
    layout = build_layout(family, config, processor, None if family.default_prompt else "a photo of ")
    return model, family, processor, layout
