"""BLIP-2 (Salesforce/blip2-opt-*, Salesforce/blip2-flan-t5-*): ViT-g + Q-Former, whose query tokens stand in the
language model's input as image-token placeholders; OPT (decoder only) or Flan-T5 (encoder-decoder) writes."""

from __future__ import annotations

from transformers import Blip2ForConditionalGeneration, PretrainedConfig, PreTrainedTokenizerBase

from captioning.families.base import ModelFamily
from captioning.layout import DECODER_ONLY, ENCODER_DECODER, CaptionLayout, tokenize_prompt

T5_TYPES = {"t5", "mt5", "umt5"}


def language_model_type(config: PretrainedConfig) -> str | None:
    """The language model's type of a BLIP-2 config ("opt", "t5", ...), None for other configs; another language
    model is an error naming the supported ones."""
    if getattr(config, "model_type", None) != "blip-2":
        return None
    text_type = getattr(config.text_config, "model_type", None)
    if text_type != "opt" and text_type not in T5_TYPES:
        raise ValueError(
            f"--model_name_or_path: BLIP-2 with a {text_type!r} language model is not supported; "
            "supported are OPT (Salesforce/blip2-opt-*) and Flan-T5 (Salesforce/blip2-flan-t5-*)."
        )
    return text_type


def build_layout(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, prompt: str = "") -> CaptionLayout:
    """OPT: <image>*Q BOS prompt caption EOS in one sequence; T5: <image>*Q prompt EOS to the encoder, caption EOS as
    the target. Q is the number of query tokens; ids come from the config (the ids ``generate`` uses)."""
    prompt_ids, caption_prefix = tokenize_prompt(tokenizer, prompt)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(
            "--model_name_or_path: this BLIP-2 checkpoint has no image_token_index in its config (it predates "
            "transformers' image-token layout); use a current revision of the checkpoint."
        )
    text = config.text_config
    decoder_only = language_model_type(config) == "opt"
    return CaptionLayout(
        kind=DECODER_ONLY if decoder_only else ENCODER_DECODER,
        bos_id=text.bos_token_id if decoder_only else None,
        eos_id=text.eos_token_id,
        pad_id=text.pad_token_id,
        prompt_ids=prompt_ids,
        image_token_id=image_token_id,
        num_image_tokens=config.num_query_tokens,
        caption_prefix=caption_prefix,
    )


COMMON = dict(
    model_class=Blip2ForConditionalGeneration,
    build_layout=build_layout,
    language_prefix="language_model.",
    vision_prefix="vision_model.",
    vision_lora_target_modules=("qkv", "projection"),
    image_feature_module="language_projection",  # the Q-Former's 32 tokens, projected into the language model
    feature_path=("vision_model", "qformer"),  # what generate() runs before the projection, not get_image_features
    num_beams=5,  # BLIP-2's caption recipe: beams 5, 8-30 tokens
    max_new_tokens=30,
    min_new_tokens=8,
)

BLIP2_OPT = ModelFamily(
    name="blip2-opt",
    label="BLIP-2 (OPT)",
    examples="Salesforce/blip2-opt-2.7b, -6.7b",
    detect=lambda config: language_model_type(config) == "opt",
    lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
    snippet="""\
# As in training: one image token per query token, BOS, then the prompt.
input_ids = [config.image_token_id] * config.num_query_tokens + [config.text_config.bos_token_id, *prompt_ids]
skip = len(input_ids)  # the output repeats the input""",
    **COMMON,
)
BLIP2_T5 = ModelFamily(
    name="blip2-t5",
    label="BLIP-2 (Flan-T5)",
    examples="Salesforce/blip2-flan-t5-xl, -xxl",
    detect=lambda config: language_model_type(config) in T5_TYPES,
    lora_target_modules=("q", "k", "v", "o"),
    snippet="""\
# As in training: one image token per query token, then the prompt and EOS for the encoder.
input_ids = [config.image_token_id] * config.num_query_tokens + [*prompt_ids, config.text_config.eos_token_id]
skip = 0  # the decoder output holds the caption only""",
    **COMMON,
)
