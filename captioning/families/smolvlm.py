"""SmolVLM / SmolVLM2 (HuggingFaceTB/SmolVLM2-*, HuggingFaceTB/SmolVLM-*): a SigLIP vision tower whose patch features
a pixel-shuffle ``connector`` projects into the ``<image>`` placeholders of a Llama chat model. Captions are the
assistant's answer in the checkpoint's own chat template, built through ``processor.apply_chat_template``:

    input_ids   <|im_start|>User:<fake><global-img><image>*N<fake>prompt<end_of_utterance>\\nAssistant:
                caption <end_of_utterance> \\n
    labels      -100 (everything up to and including "Assistant:")  caption <end_of_utterance> -100
Generation gets the same conversation up to ``Assistant:`` (``add_generation_prompt``); with image splitting off
(the captioning default) it is the same for every image, and ``generate`` stops at ``<end_of_utterance>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from transformers import PretrainedConfig, SmolVLMForConditionalGeneration

from captioning.families.base import ModelFamily
from captioning.layout import DECODER_ONLY, IGNORE_INDEX, CaptionLayout

DEFAULT_PROMPT = "Describe this image in one sentence."
END_OF_UTTERANCE = "<end_of_utterance>"
_CAPTION = "\x00caption\x00"  # stands for the caption while the template is rendered as text


@dataclass(frozen=True)
class ChatLayout(CaptionLayout):
    """``prompt_ids`` is the whole generation prompt (image tokens included); ``suffix_ids`` follow the caption
    (``<end_of_utterance>`` and the template's newline), learnt up to and including ``eos_id``."""

    suffix_ids: tuple[int, ...] = ()

    def training_sequence(self, caption_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        suffix = list(self.suffix_ids)
        learnt = suffix.index(self.eos_id) + 1 if self.eos_id in suffix else len(suffix)
        input_ids = [*self.prompt_ids, *caption_ids, *suffix]
        labels = [IGNORE_INDEX] * len(self.prompt_ids) + [*caption_ids, *suffix[:learnt]]
        return input_ids, labels + [IGNORE_INDEX] * (len(suffix) - learnt)

    def generation_prompt(self) -> list[int]:
        return list(self.prompt_ids)

    @property
    def generated_prefix_length(self) -> int:
        return len(self.prompt_ids)


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "smolvlm"


def conversation(prompt: str, image=None, caption: str | None = None) -> list[dict]:
    """The chat a caption is trained and generated in: the user sends the image and the instruction, the assistant
    answers with the caption (none for generation)."""
    user = [{"type": "image", **({"image": image} if image is not None else {})}]
    if prompt:
        user.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": user}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


def build_layout(config: PretrainedConfig, processor, prompt: str = DEFAULT_PROMPT) -> ChatLayout:
    """Prompt ids from the checkpoint's own processor and chat template (for a blank image: with image splitting off
    every image gets the same tokens); the text around the caption from the template rendered with a stand-in.
    Turns the processor's image splitting off."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "apply_chat_template"):
        raise TypeError("SmolVLM's caption layout is built from its processor (SmolVLMProcessor), not a tokenizer")
    # Captioning keeps one global image per picture: the same prompt for every image, no padding of image crops.
    # The processor's image processor is the one the collator uses, so this applies to the whole run.
    processor.image_processor.do_image_splitting = False
    blank = Image.new("RGB", (8, 8))
    encoded = processor.apply_chat_template(
        conversation(prompt, blank), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt_text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(conversation(prompt, caption=_CAPTION), tokenize=False)
    if not full_text.startswith(prompt_text) or _CAPTION not in full_text:
        raise ValueError("SmolVLM's chat template does not continue the generation prompt with the answer")
    caption_prefix, suffix = full_text[len(prompt_text) :].split(_CAPTION)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    return ChatLayout(
        kind=DECODER_ONLY,
        bos_id=None,
        eos_id=eos_id,
        pad_id=tokenizer.pad_token_id,
        prompt_ids=tuple(int(i) for i in encoded["input_ids"][0]),
        image_token_id=config.image_token_id,
        num_image_tokens=int(sum(1 for i in encoded["input_ids"][0] if i == config.image_token_id)),
        caption_prefix=caption_prefix,
        suffix_ids=tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]),
        # The model splits the connector's output per row of pixel_values: grouped batches hand it each image's
        # features, computed once, as mm_encoder_outputs (captioning/grouping.py).
        grouping_by="encoder_outputs",
    )


SNIPPET = """\
# As in training: the chat template's user turn (image + prompt) up to "Assistant:", image splitting off.
processor.image_processor.do_image_splitting = False
pixel_values = processor.image_processor(images=image, return_tensors="pt").pixel_values.to(device)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
input_ids = processor(text=text, images=[image], return_tensors="pt").input_ids[0].tolist()
skip = len(input_ids)  # the output repeats the input"""

SMOLVLM = ModelFamily(
    name="smolvlm",
    label="SmolVLM",
    examples="HuggingFaceTB/SmolVLM2-500M-Video-Instruct, HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    model_class=SmolVLMForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # Llama's attention and MLP; searched under language_prefix only, so SigLIP's q/k/v_proj stay out.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    language_prefix="model.text_model.",
    vision_prefix="model.vision_model.",
    vision_lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),  # SigLIP's attention
    image_feature_module="model.connector",  # pixel-shuffled SigLIP features projected into the text model's input
    # Greedy and short, as SmolVLM's own captioning examples; every caption ends with <end_of_utterance>.
    num_beams=1,
    max_new_tokens=30,
    min_new_tokens=0,
    snippet=SNIPPET,
    default_prompt=DEFAULT_PROMPT,
    layout_from_processor=True,
)
