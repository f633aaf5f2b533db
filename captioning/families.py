"""The model families this tool fine-tunes, and everything that differs between them, in one table."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration, PretrainedConfig, PreTrainedModel

# How a family lays out a caption around the image and prompt (see collators.py for the exact sequences).
BLIP_DECODER = "blip_decoder"  # BERT-style text decoder; [DEC] at position 0, [SEP] ends the caption
DECODER_ONLY = "decoder_only"  # BLIP-2 + OPT: query-token placeholders, BOS, prompt, caption, EOS in one sequence
ENCODER_DECODER = (
    "encoder_decoder"  # BLIP-2 + Flan-T5: placeholders and prompt go to the encoder, caption is the target
)


@dataclass(frozen=True)
class ModelFamily:
    """One row of the family table."""

    name: str
    model_class: type[PreTrainedModel]
    layout: str
    lora_target_modules: tuple[str, ...]  # default LoRA targets (name suffixes), searched in language_prefix only
    language_prefix: str  # module-name prefix of the text side
    vision_prefix: str  # module-name prefix of the vision tower
    vision_lora_target_modules: tuple[str, ...]  # attention layers adapted by --lora_vision
    image_feature_module: str  # where the image side ends; its output is shared by the captions of an image
    num_beams: int  # generation defaults, after LAVIS' caption recipes
    max_new_tokens: int
    min_new_tokens: int


BLIP = ModelFamily(
    name="blip",
    model_class=BlipForConditionalGeneration,
    layout=BLIP_DECODER,
    lora_target_modules=("query", "value"),
    language_prefix="text_decoder.",
    vision_prefix="vision_model.",
    vision_lora_target_modules=("qkv", "projection"),
    image_feature_module="vision_model",
    num_beams=3,
    max_new_tokens=20,
    min_new_tokens=5,
)
BLIP2_OPT = ModelFamily(
    name="blip2-opt",
    model_class=Blip2ForConditionalGeneration,
    layout=DECODER_ONLY,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
    language_prefix="language_model.",
    vision_prefix="vision_model.",
    vision_lora_target_modules=("qkv", "projection"),
    image_feature_module="language_projection",
    num_beams=5,
    max_new_tokens=30,
    min_new_tokens=8,
)
BLIP2_T5 = ModelFamily(
    name="blip2-t5",
    model_class=Blip2ForConditionalGeneration,
    layout=ENCODER_DECODER,
    lora_target_modules=("q", "k", "v", "o"),
    language_prefix="language_model.",
    vision_prefix="vision_model.",
    vision_lora_target_modules=("qkv", "projection"),
    image_feature_module="language_projection",
    num_beams=5,
    max_new_tokens=30,
    min_new_tokens=8,
)

FAMILIES = (BLIP, BLIP2_OPT, BLIP2_T5)
_T5_TYPES = {"t5", "mt5", "umt5"}


def detect_family(config: PretrainedConfig) -> ModelFamily:
    """Pick the family from a checkpoint's config; unsupported architectures get an error that lists what works."""
    model_type = getattr(config, "model_type", None)
    if model_type == "blip":
        return BLIP
    if model_type == "blip-2":
        text_type = getattr(config.text_config, "model_type", None)
        if text_type == "opt":
            return BLIP2_OPT
        if text_type in _T5_TYPES:
            return BLIP2_T5
        raise ValueError(
            f"--model_name_or_path: BLIP-2 with a {text_type!r} language model is not supported; "
            "supported are OPT (Salesforce/blip2-opt-*) and Flan-T5 (Salesforce/blip2-flan-t5-*)."
        )
    raise ValueError(
        f"--model_name_or_path: model type {model_type!r} is not a captioner this tool fine-tunes; use a BLIP "
        "(Salesforce/blip-image-captioning-*) or BLIP-2 (Salesforce/blip2-opt-*, Salesforce/blip2-flan-t5-*) "
        "checkpoint."
    )
