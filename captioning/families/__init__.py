"""The model families this tool fine-tunes, one module each (``blip``, ``blip2``, ...), each declaring its
``ModelFamily`` (``base``): detection, model class, caption layout, LoRA targets, image-feature boundary, generation
defaults and model-card snippet. Adding a family means adding its module and listing it in ``FAMILIES``."""

from __future__ import annotations

from transformers import PretrainedConfig

from captioning.families.base import ModelFamily
from captioning.families.blip import BLIP
from captioning.families.blip2 import BLIP2_OPT, BLIP2_T5
from captioning.families.florence2 import FLORENCE2
from captioning.families.paligemma import PALIGEMMA
from captioning.families.smolvlm import SMOLVLM

FAMILIES: tuple[ModelFamily, ...] = (BLIP, BLIP2_OPT, BLIP2_T5, FLORENCE2, PALIGEMMA, SMOLVLM)

__all__ = [
    "BLIP",
    "BLIP2_OPT",
    "BLIP2_T5",
    "FAMILIES",
    "FLORENCE2",
    "ModelFamily",
    "PALIGEMMA",
    "SMOLVLM",
    "check_config_json",
    "detect_family",
]


def detect_family(config: PretrainedConfig) -> ModelFamily:
    """Pick the family from a checkpoint's config; unsupported architectures get an error that lists what works."""
    for family in FAMILIES:
        if family.detect(config):
            return family
    supported = "; ".join(f"{family.label} ({family.examples})" for family in FAMILIES)
    raise ValueError(
        f"--model_name_or_path: model type {getattr(config, 'model_type', None)!r} is not a captioner this tool "
        f"fine-tunes; use one of: {supported}."
    )


def check_config_json(config: dict, source: str = "") -> None:
    """Let each family refuse a config.json (as a dict) it recognises but cannot load, before AutoConfig reads it."""
    for family in FAMILIES:
        if family.check_config_json is not None:
            family.check_config_json(config, source)
