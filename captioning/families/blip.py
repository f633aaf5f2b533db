"""BLIP (Salesforce/blip-image-captioning-*): ViT + a BERT-style text decoder with cross-attention to the image."""

from __future__ import annotations

from transformers import BlipForConditionalGeneration, PretrainedConfig, PreTrainedTokenizerBase

from captioning.families.base import ModelFamily
from captioning.layout import BLIP_DECODER, CaptionLayout, tokenize_prompt


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "blip"


def build_layout(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, prompt: str = "") -> CaptionLayout:
    """[DEC] prompt caption [SEP]: the framing ids come from the config (the ids ``generate`` uses), not the
    tokenizer, whose [CLS] BLIP's ``generate`` never writes."""
    prompt_ids, caption_prefix = tokenize_prompt(tokenizer, prompt)
    text = config.text_config
    return CaptionLayout(
        kind=BLIP_DECODER,
        bos_id=text.bos_token_id,
        eos_id=text.sep_token_id,
        pad_id=text.pad_token_id,
        prompt_ids=prompt_ids,
        caption_prefix=caption_prefix,
        once_per_image=("crossattention.self.key", "crossattention.self.value"),
    )


SNIPPET = """\
# As in training: [DEC] (the decoder's BOS), then the prompt; generate() drops the final [SEP].
input_ids = [config.text_config.bos_token_id, *prompt_ids, config.text_config.sep_token_id]
skip = 1 + len(prompt_ids)  # the output repeats [DEC] and the prompt"""

BLIP = ModelFamily(
    name="blip",
    label="BLIP",
    examples="Salesforce/blip-image-captioning-base, -large",
    model_class=BlipForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    lora_target_modules=("query", "value"),
    language_prefix="text_decoder.",
    vision_prefix="vision_model.",
    vision_lora_target_modules=("qkv", "projection"),
    image_feature_module="vision_model",
    feature_cache="module_output",
    cached_fields=("last_hidden_state",),
    num_beams=3,  # BLIP's caption recipe: beams 3, 5-20 tokens
    max_new_tokens=20,
    min_new_tokens=5,
    snippet=SNIPPET,
)
