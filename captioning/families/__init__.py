"""The model families this tool fine-tunes, one module each (``blip``, ``blip2``, ...), each declaring its
``ModelFamily`` (``base``): detection, model class, caption layout, LoRA targets, image-feature boundary, generation
defaults and model-card snippet. Adding a family means adding its module and listing it in ``FAMILIES``."""

from __future__ import annotations

from transformers import PretrainedConfig

from captioning.families.base import ModelFamily
from captioning.families.blip import BLIP
from captioning.families.blip2 import BLIP2_OPT, BLIP2_T5
from captioning.families.florence2 import FLORENCE2
from captioning.families.idefics3 import IDEFICS3
from captioning.families.paligemma import PALIGEMMA
from captioning.families.qwen2_5_vl import QWEN2_5_VL
from captioning.families.qwen3_vl import QWEN3_VL
from captioning.families.smolvlm import SMOLVLM

FAMILIES: tuple[ModelFamily, ...] = (
    BLIP,
    BLIP2_OPT,
    BLIP2_T5,
    FLORENCE2,
    PALIGEMMA,
    SMOLVLM,
    IDEFICS3,
    QWEN2_5_VL,
    QWEN3_VL,
)

__all__ = [
    "BLIP",
    "BLIP2_OPT",
    "BLIP2_T5",
    "FAMILIES",
    "FLORENCE2",
    "IDEFICS3",
    "ModelFamily",
    "PALIGEMMA",
    "QWEN2_5_VL",
    "QWEN3_VL",
    "SMOLVLM",
    "check_config_json",
    "check_image_flags",
    "detect_family",
    "family_by_name",
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


def family_by_name(name: str) -> ModelFamily:
    """The family a run's captioning_config.json (``family``) or model card names."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown captioner family {name!r}; known: {', '.join(f.name for f in FAMILIES)}.")


def check_config_json(config: dict, source: str = "") -> None:
    """Let each family refuse a config.json (as a dict) it recognises but cannot load, before AutoConfig reads it."""
    for family in FAMILIES:
        if family.check_config_json is not None:
            family.check_config_json(config, source)


IMAGE_FLAG_DEFAULTS = {"image_splitting": False, "min_pixels": None, "max_pixels": None}


def check_image_flags(family: ModelFamily, data_args) -> None:
    """A family-specific image flag given for a family that does not read it is an error, not silently ignored."""
    for name, default in IMAGE_FLAG_DEFAULTS.items():
        if getattr(data_args, name, default) != default and name not in family.image_flags:
            readers = ", ".join(f.label for f in FAMILIES if name in f.image_flags) or "no family"
            raise ValueError(
                f"--{name} applies to {readers}, not to {family.label} (the checkpoint given by "
                f"--model_name_or_path): leave it out."
            )
