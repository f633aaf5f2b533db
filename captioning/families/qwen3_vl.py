"""Qwen3-VL (Qwen/Qwen3-VL-2B-Instruct, -4B-, -8B-Instruct): a ViT on 16-pixel patches whose ``merger`` projects
each 2 x 2 patches into one ``<|image_pad|>`` token of a Qwen3 chat model, and whose DeepStack mergers add features
of intermediate ViT layers to the first language layers at the same positions. Captions are the assistant's answer
in the checkpoint's chat template (no default system turn); images keep their aspect ratio, one visual token per
32 x 32 pixels, within --min_pixels / --max_pixels (captioning/families/qwen_vl.py shows the layout). The
mixture-of-experts checkpoints (Qwen3-VL-30B-A3B, model type qwen3_vl_moe) are another model class, not covered."""

from __future__ import annotations

from functools import partial

from transformers import PretrainedConfig, Qwen3VLForConditionalGeneration

from captioning.families.base import ModelFamily
from captioning.families.qwen_vl import (
    DEFAULT_PROMPT,
    SNIPPET,
    SNIPPET_GENERATE_KWARGS,
    build_layout,
    configure_processor,
)

LABEL = "Qwen3-VL"


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "qwen3_vl"


QWEN3_VL = ModelFamily(
    name="qwen3-vl",
    label=LABEL,
    examples="Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen3-VL-8B-Instruct",
    model_class=Qwen3VLForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # Qwen3's attention and MLP; searched under language_prefix only.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    language_prefix="model.language_model.",
    vision_prefix="model.visual.",
    vision_lora_target_modules=("attn.qkv", "attn.proj"),  # the ViT's attention (fused q/k/v, output projection)
    # The whole vision model ends the image side: its merger's output fills the <|image_pad|> tokens and its
    # DeepStack mergers' outputs go to the first language layers.
    image_feature_module="model.visual",
    # Greedy and short, as SmolVLM; every caption ends with <|im_end|>, which the model then says when done.
    num_beams=1,
    max_new_tokens=30,
    min_new_tokens=0,
    snippet=SNIPPET,
    snippet_generate_kwargs=SNIPPET_GENERATE_KWARGS,
    default_prompt=DEFAULT_PROMPT,
    layout_from_processor=True,
    chat_template=True,
    configure_processor=partial(configure_processor, label=LABEL),
    image_flags=("min_pixels", "max_pixels"),
    fixed_image_size=False,
    cached_fields=("pooler_output", "deepstack_features"),  # the merger's output and the deepstack layers' inputs
)
