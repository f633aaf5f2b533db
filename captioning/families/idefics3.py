"""Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3), SmolVLM's parent architecture: a SigLIP vision tower whose patch
features a pixel-shuffle ``connector`` projects into the ``<image>`` placeholders of a Llama 3 chat model. Captions
are the assistant's answer in the checkpoint's own chat template, laid out as SmolVLM's (captioning/families/
smolvlm.py), whose layout code this family reuses:

    input_ids   <|begin_of_text|>User:<fake><global-img><image>*N<fake>prompt<end_of_utterance>\\nAssistant:
                caption <end_of_utterance> \\n
    labels      -100 (everything up to and including "Assistant:")  caption <end_of_utterance> -100
Generation gets the same conversation up to ``Assistant:``; ``generate`` stops at ``<end_of_utterance>``. Image
splitting (on in the Hub's processor) is off unless ``--image_splitting`` is given: one global image per picture, the
same prompt for every image. With it, each image also becomes a grid of tiles with a prompt per grid, as SmolVLM's."""

from __future__ import annotations

from transformers import Idefics3ForConditionalGeneration, PretrainedConfig

from captioning.families.base import ModelFamily
from captioning.families.smolvlm import DEFAULT_PROMPT, ChatLayout, configure_processor
from captioning.families.smolvlm import build_layout as build_chat_layout


def detect(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "idefics3"


def build_layout(config: PretrainedConfig, processor, prompt: str = DEFAULT_PROMPT) -> ChatLayout:
    """SmolVLM's chat layout (prompt ids from the processor's own chat template, caption and ``<end_of_utterance>``
    learnt), which follows the processor's image splitting: ``configure_processor`` sets it from --image_splitting
    before a run builds the layout, and the saved processor carries it to inference."""
    if getattr(processor, "tokenizer", None) is None or not hasattr(processor, "apply_chat_template"):
        raise TypeError("Idefics3's caption layout is built from its processor (Idefics3Processor), not a tokenizer")
    return build_chat_layout(config, processor, prompt)


SNIPPET = """\
# As in training: the chat template's user turn (image + prompt) up to "Assistant:"; the saved processor cuts the
# image into tiles or not (--image_splitting), as it did in training.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
# The template starts with <|begin_of_text|>: the tokenizer must not add a second one.
encoded = processor(text=text, images=[image], add_special_tokens=False, return_tensors="pt")
pixel_values = encoded.pixel_values.to(device)
input_ids = encoded.input_ids[0].tolist()
skip = len(input_ids)  # the output repeats the input"""

IDEFICS3 = ModelFamily(
    name="idefics3",
    label="Idefics3",
    examples="HuggingFaceM4/Idefics3-8B-Llama3",
    model_class=Idefics3ForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # Llama's attention and MLP; searched under language_prefix only, so SigLIP's q/k/v_proj stay out.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    language_prefix="model.text_model.",
    vision_prefix="model.vision_model.",
    vision_lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),  # SigLIP's attention
    image_feature_module="model.connector",  # pixel-shuffled SigLIP features projected into the text model's input
    # Greedy and short, as SmolVLM's (Idefics3's descendant) captioning recipes; every caption ends with
    # <end_of_utterance>.
    num_beams=1,
    max_new_tokens=30,
    min_new_tokens=0,
    snippet=SNIPPET,
    default_prompt=DEFAULT_PROMPT,
    layout_from_processor=True,
    chat_template=True,
    # --image_splitting (off unless given, whatever the checkpoint ships), as SmolVLM's: Idefics3's processor cuts
    # tiles and writes their placeholders alike.
    configure_processor=configure_processor,
    image_flags=("image_splitting",),
)
