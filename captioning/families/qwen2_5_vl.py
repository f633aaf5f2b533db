"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct): a windowed-attention ViT on 14-pixel
patches whose ``merger`` projects each 2 x 2 patches into one ``<|image_pad|>`` token of a Qwen2.5 chat model.
Captions are the assistant's answer in the checkpoint's chat template (which adds its default system turn, "You are
a helpful assistant."); images keep their aspect ratio, one visual token per 28 x 28 pixels, within --min_pixels /
--max_pixels (captioning/families/qwen_vl.py shows the layout)."""

from __future__ import annotations

from functools import partial

from transformers import PretrainedConfig, Qwen2_5_VLForConditionalGeneration

from captioning.families.base import ModelFamily
from captioning.families.qwen_vl import (
    DEFAULT_PROMPT,
    SNIPPET,
    SNIPPET_GENERATE_KWARGS,
    build_layout,
    configure_processor,
)

LABEL = "Qwen2.5-VL"


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "qwen2_5_vl"


QWEN2_5_VL = ModelFamily(
    name="qwen2.5-vl",
    label=LABEL,
    examples="Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct",
    model_class=Qwen2_5_VLForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # Qwen2.5's attention and MLP; searched under language_prefix only, so the vision blocks' gate/up/down_proj
    # (the ViT has a gated MLP with the same names) stay out.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    language_prefix="model.language_model.",
    vision_prefix="model.visual.",
    vision_lora_target_modules=("attn.qkv", "attn.proj"),  # the ViT's attention (fused q/k/v, output projection)
    image_feature_module="model.visual.merger",  # 2 x 2 patch features projected into the language model's input
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
)
