"""PaliGemma / PaliGemma 2 (google/paligemma-3b-*, google/paligemma2-*): SigLIP + a linear projector whose outputs fill
the ``<image>`` placeholders of a Gemma (2) prefix-LM; the prefix (image, <bos>, prompt, "\\n") attends both ways,
the caption after it causally, as ``token_type_ids`` mark them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PaliGemmaForConditionalGeneration, PretrainedConfig, PreTrainedTokenizerBase

from captioning.families.base import ModelFamily
from captioning.layout import IGNORE_INDEX, CaptionLayout

PREFIX_LM = "prefix_lm"
PREFIX, SUFFIX = 0, 1  # token_type_ids: the bidirectional prefix, the causal suffix (caption)
DEFAULT_PROMPT = "caption en"  # PaliGemma's short-caption task prefix; the processor writes the "\n" after it


@dataclass(frozen=True)
class PrefixLMLayout(CaptionLayout):
    """PaliGemma's rows, exactly as ``PaliGemmaProcessor(images, text=prompt, suffix=caption)`` builds them:

    ``input_ids``       <image>*N <bos> prompt "\\n"   caption <eos>
    ``token_type_ids``  0 ......................... 0   1 ......... 1
    ``labels``          -100 ...................... -100 caption <eos>
    Generation gets the prefix alone with ``token_type_ids`` 0 (generate marks each new token 1). The model always
    needs ``token_type_ids``: without them the prefix is causal, and PaliGemma 1 under SDPA even attends to the
    caption's future. Pads (right) are ``pad_id`` / token type 0 / label -100 / attention 0, as the processor pads.
    """

    @property
    def prefix(self) -> list[int]:
        return [*self.image_tokens, self.bos_id, *self.prompt_ids]

    def training_sequence(self, caption_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        caption = [*caption_ids, self.eos_id]
        return self.prefix + caption, [IGNORE_INDEX] * len(self.prefix) + caption

    def training_row(self, caption_ids: Sequence[int], num_image_tokens: int | None = None) -> dict[str, list[int]]:
        input_ids, labels = self.training_sequence(caption_ids)
        types = [PREFIX] * len(self.prefix) + [SUFFIX] * (len(input_ids) - len(self.prefix))
        return {"input_ids": input_ids, "token_type_ids": types, "labels": labels}

    def generation_prompt(self) -> list[int]:
        return self.prefix

    def generation_row(self, num_image_tokens: int | None = None) -> dict[str, list[int]]:
        prompt = self.prefix
        return {"input_ids": prompt, "attention_mask": [1] * len(prompt), "token_type_ids": [PREFIX] * len(prompt)}

    def padding_values(self) -> dict[str, int]:
        return {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "token_type_ids": PREFIX}

    @property
    def generated_prefix_length(self) -> int:
        return len(self.prefix)


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "paligemma"


def build_layout(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, prompt: str = DEFAULT_PROMPT
) -> PrefixLMLayout:
    """The processor's row: N = (image_size // patch_size)^2 image tokens; <bos>, <eos> and <pad> are the
    tokenizer's (the strings the processor writes). The caption is tokenized on its own (no leading space: "a", not
    "▁a"), as the processor tokenizes the suffix; prompt and "\\n" together, as it tokenizes ``prompt + "\\n"``."""
    vision = config.vision_config
    # The processor tokenizes prompt + "\n" as one text, so the prompt ids here end with the newline.
    prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    return PrefixLMLayout(
        kind=PREFIX_LM,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        prompt_ids=tuple(prompt_ids),
        image_token_id=config.image_token_id,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        caption_prefix="",
    )


SNIPPET = """\
# As in training (PaliGemmaProcessor's layout): one <image> per patch, <bos>, the prompt and "\\n".
num_image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
prefix = processor.tokenizer(PROMPT + "\\n", add_special_tokens=False).input_ids
input_ids = [config.image_token_id] * num_image_tokens + [processor.tokenizer.bos_token_id, *prefix]
skip = len(input_ids)  # the output repeats the input"""
# PaliGemma needs token_type_ids: 0 marks the prefix that attends both ways (generate marks new tokens 1).
SNIPPET_GENERATE_KWARGS = "token_type_ids=torch.zeros_like(input_ids),  # 0: the bidirectional prefix"

PALIGEMMA = ModelFamily(
    name="paligemma",
    label="PaliGemma",
    examples="google/paligemma2-3b-pt-224, google/paligemma-3b-pt-224",
    model_class=PaliGemmaForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # Gemma's attention and MLP; searched under language_prefix only, so SigLIP's q/k/v_proj stay out.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    language_prefix="model.language_model.",
    vision_prefix="model.vision_tower.",
    vision_lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),  # SigLIP's attention
    image_feature_module="model.multi_modal_projector",  # SigLIP's patch features projected into Gemma's input
    # Greedy: PaliGemma's own caption evaluations (big_vision transfers, the HF model cards) decode greedily, and
    # beams would multiply the KV cache of a 3B model; min 0 because every training caption ends with <eos>, which
    # the model then says when the caption is done (a forced minimum would only suppress it).
    num_beams=1,
    max_new_tokens=30,
    min_new_tokens=0,
    snippet=SNIPPET,
    snippet_generate_kwargs=SNIPPET_GENERATE_KWARGS,
    default_prompt=DEFAULT_PROMPT,
)
