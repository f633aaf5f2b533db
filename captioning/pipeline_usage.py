"""The transformers pipeline that loads what a run writes: its task, the call that captions one image as training
did, and the model card's three lines of it.

``pipeline("image-text-to-text", model=..., processor=...)`` loads an adapter folder or Hub repository on the base
its adapter_config.json names. ``processor=`` is not optional here: without it the pipeline loads the base's
processor, whose image options may not be the run's (Idefics3 and SmolVLM split images into tiles unless the run
turned that off; Qwen's pixel range). The run's generation settings go in as keyword arguments: an adapter cannot
carry a generation config the pipeline would read (it reads the base's)."""

from __future__ import annotations

from typing import Any

from captioning.families import ModelFamily
from captioning.families.smolvlm import conversation

PIPELINE_TASK = "image-text-to-text"  # the task transformers 5 loads captioners with (and the Hub's pipeline_tag)
EXAMPLE_IMAGE = "image.jpg"  # the image the card's snippet captions


def pipeline_prompt(family: ModelFamily, prompt: str) -> str:
    """The caption prompt as training tokenized it: OPT's byte-level BPE gets it without its trailing space (the
    space goes with the caption, captioning/layout.py)."""
    return prompt.rstrip() if family.name == "blip2-opt" else prompt


def pipeline_inputs(family: ModelFamily, prompt: str, image: Any) -> dict[str, Any]:
    """The pipeline call's inputs for one image (a path, URL or PIL image) with the run's caption prompt: the chat
    families' conversation as training built it, else the image and the prompt as text ("" for none)."""
    if family.chat_template:
        return {"text": conversation(prompt, image)}
    return {"images": image, "text": pipeline_prompt(family, prompt)}


def caption_with_pipeline(captioner, family: ModelFamily, prompt: str, image: Any) -> str:
    """One image's caption from a loaded ``image-text-to-text`` pipeline: the generated text after the prompt."""
    result = captioner(**pipeline_inputs(family, prompt, image), return_full_text=False)
    return result[0]["generated_text"].strip()


def pipeline_snippet(model_id: str, family: ModelFamily, prompt: str, generation: dict[str, Any], literal) -> str:
    """Three lines of Python that caption ``EXAMPLE_IMAGE`` with ``model_id`` as training did (``literal``: how a
    value is written as Python)."""
    settings = "".join(f", {name}={literal(value)}" for name, value in generation.items())
    inputs = ", ".join(
        f"{name}={literal(value)}" for name, value in pipeline_inputs(family, prompt, EXAMPLE_IMAGE).items()
    )
    model = literal(model_id)
    return (
        "from transformers import pipeline\n"
        f"captioner = pipeline({literal(PIPELINE_TASK)}, model={model}, processor={model}{settings})\n"
        f'caption = captioner({inputs}, return_full_text=False)[0]["generated_text"].strip()'
    )
