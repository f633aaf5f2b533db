"""What Qwen2.5-VL and Qwen3-VL share (``qwen2_5_vl.py``, ``qwen3_vl.py``): the caption as the assistant's answer in
the checkpoint's own chat template, with dynamic resolution. Each image keeps its aspect ratio within the image
processor's min / max pixels, cut into patches merged 2 x 2 into visual tokens, so rows hold different numbers of
``<|image_pad|>`` tokens (``prod(image_grid_thw) / merge_size**2``):

    input_ids   [<|im_start|>system ... <|im_end|>\\n] <|im_start|>user\\n<|vision_start|><|image_pad|>*N<|vision_end|>
                prompt<|im_end|>\\n<|im_start|>assistant\\n caption <|im_end|> \\n
    labels      -100 (everything up to and including "assistant\\n")      caption <|im_end|> -100
Each row also carries ``mm_token_type_ids`` (1 on the image tokens), from which the model builds its 3-D rotary
positions with the row's ``image_grid_thw``. Generation gets the conversation up to ``assistant\\n``
(``add_generation_prompt``), left-padded, and ``generate`` stops at ``<|im_end|>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PretrainedConfig
from transformers.image_utils import SizeDict

from captioning.families.smolvlm import ChatLayout, conversation
from captioning.layout import DECODER_ONLY, IGNORE_INDEX

DEFAULT_PROMPT = "Describe this image in one sentence."
END_OF_TURN = "<|im_end|>"
# --min_pixels / --max_pixels defaults, in visual tokens: 256 tokens (about a 448 x 448 picture for Qwen2.5-VL, 512 x
# 512 for Qwen3-VL) describe a photo well enough for one sentence, where the checkpoints' own limit (16384 tokens)
# would make a batch of large photos cost as much as a long document.
DEFAULT_MIN_TOKENS = 4
DEFAULT_MAX_TOKENS = 256
_CAPTION = "\x00caption\x00"  # stands for the caption while the template is rendered as text


@dataclass(frozen=True)
class QwenChatLayout(ChatLayout):
    """``prompt_ids`` is the generation prompt with the template's single ``<|image_pad|>``; each row repeats it
    for its own image's visual tokens (``image_token_counts``). ``suffix_ids`` follow the caption (``<|im_end|>``,
    learnt, and the template's newline, not learnt)."""

    merge_size: int = 2  # patches merged into one visual token, per side

    def process_images(self, image_processor, images: list, **kwargs) -> dict:
        """The images as one flat list: Qwen's image processor gives the patches of all of them in one sequence
        (``pixel_values``, (patches, 3 * 2 * patch^2)) and each image's grid (``image_grid_thw``, (B, 3))."""
        return image_processor(images=images, return_tensors="pt", **kwargs)

    def image_token_counts(self, image_inputs: dict) -> list[int]:
        grid = image_inputs["image_grid_thw"]
        return (grid.prod(-1) // self.merge_size**2).tolist()

    def _expand(self, ids: Sequence[int], num_image_tokens: int | None, fill: int) -> list[int]:
        """``ids`` (which start with ``prompt_ids``) with the placeholder repeated ``num_image_tokens`` times."""
        if num_image_tokens is None:
            raise TypeError("Qwen rows need their image's number of visual tokens (layout.image_token_counts)")
        at = self.prompt_ids.index(self.image_token_id)
        return [*ids[:at], *[fill] * num_image_tokens, *ids[at + 1 :]]

    def _with_token_types(self, row: dict[str, list[int]]) -> dict[str, list[int]]:
        """``mm_token_type_ids``: 1 on the image tokens, 0 elsewhere (the processor's own output, which the model
        needs for its rotary positions)."""
        return {**row, "mm_token_type_ids": [int(token == self.image_token_id) for token in row["input_ids"]]}

    def training_row(self, caption_ids: Sequence[int], num_image_tokens: int | None = None) -> dict[str, list[int]]:
        input_ids, labels = self.training_sequence(caption_ids)
        return self._with_token_types(
            {
                "input_ids": self._expand(input_ids, num_image_tokens, self.image_token_id),
                "labels": self._expand(labels, num_image_tokens, IGNORE_INDEX),
            }
        )

    def generation_row(self, num_image_tokens: int | None = None) -> dict[str, list[int]]:
        prompt = self._expand(self.prompt_ids, num_image_tokens, self.image_token_id)
        return self._with_token_types({"input_ids": prompt, "attention_mask": [1] * len(prompt)})

    @property
    def generated_prefix_length(self) -> int:
        raise TypeError(
            "a Qwen prompt's length varies with its image (its <|image_pad|> tokens): cut generate's output with "
            "caption_tokens(sequences, input_ids)"
        )

    def caption_tokens(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """New tokens only: the prompts, left-padded to one width, are the first ``input_ids.shape[1]`` positions."""
        return sequences[:, input_ids.shape[1] :]


def build_layout(config: PretrainedConfig, processor, prompt: str = DEFAULT_PROMPT) -> QwenChatLayout:
    """Prompt ids from the checkpoint's own processor and chat template (for a blank image, its run of
    ``<|image_pad|>`` tokens cut back to one); the text around the caption from the template rendered with a
    stand-in."""
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None or not hasattr(processor, "apply_chat_template"):
        raise TypeError("Qwen-VL's caption layout is built from its processor (Qwen2_5_VLProcessor, Qwen3VLProcessor)")
    side = 2 * image_processor.patch_size * image_processor.merge_size
    encoded = processor.apply_chat_template(
        conversation(prompt, Image.new("RGB", (side, side))),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    ids = [int(i) for i in encoded["input_ids"][0]]
    image = config.image_token_id
    placeholders = [i for i, token in enumerate(ids) if token == image]
    if not placeholders or placeholders[-1] - placeholders[0] + 1 != len(placeholders):
        raise ValueError("Qwen-VL's chat template does not put the image's <|image_pad|> tokens in one run")
    prompt_ids = ids[: placeholders[0] + 1] + ids[placeholders[-1] + 1 :]
    prompt_text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(conversation(prompt, caption=_CAPTION), tokenize=False)
    if not full_text.startswith(prompt_text) or _CAPTION not in full_text:
        raise ValueError("Qwen-VL's chat template does not continue the generation prompt with the answer")
    caption_prefix, suffix = full_text[len(prompt_text) :].split(_CAPTION)
    return QwenChatLayout(
        kind=DECODER_ONLY,
        bos_id=None,
        eos_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        pad_id=tokenizer.pad_token_id,
        prompt_ids=tuple(prompt_ids),
        image_token_id=image,
        num_image_tokens=0,  # per image: image_token_counts
        caption_prefix=caption_prefix,
        suffix_ids=tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]),
        # The model splits the vision tower's output per image by image_grid_thw: grouped batches hand it each
        # image's features, computed once, as mm_encoder_outputs, and each row its image's grid for the rotary
        # positions (captioning/grouping.py).
        grouping_by="encoder_outputs",
        image_input_keys=("pixel_values", "image_grid_thw"),
        row_image_keys=("image_grid_thw",),
        merge_size=image_processor.merge_size,
    )


def configure_processor(processor, data_args, *, label: str, from_run: bool = False) -> None:
    """Set the image processor's pixel range from --min_pixels / --max_pixels (defaults: 4 and 256 visual tokens'
    worth, one token being (patch_size * merge_size)^2 pixels; for a run's output, ``from_run``, the range it saved,
    so that a continued run sees images as the run it continues did). Refuses a value below one token and a minimum
    above the maximum."""
    image_processor = processor.image_processor
    side = image_processor.patch_size * image_processor.merge_size
    token = side * side
    min_pixels, max_pixels = data_args.min_pixels, data_args.max_pixels
    for flag, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and value < token:
            raise ValueError(
                f"--{flag} {value} is less than one visual token of {label} ({side} x {side} = {token} pixels): "
                f"give at least {token}."
            )
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(
            f"--min_pixels {min_pixels} is more than --max_pixels {max_pixels}: images could fit neither; give a "
            "minimum at most the maximum."
        )
    saved = image_processor.size if from_run else {}
    if max_pixels is None:
        max_pixels = saved.get("longest_edge") or max(DEFAULT_MAX_TOKENS * token, min_pixels or 0)
    if min_pixels is None:
        min_pixels = min(saved.get("shortest_edge") or DEFAULT_MIN_TOKENS * token, max_pixels)
    image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)


SNIPPET = """\
# As in training: the chat template's user turn (image + prompt) up to "<|im_start|>assistant\\n". The image keeps
# its aspect ratio within the processor's min / max pixels, so its number of <|image_pad|> tokens varies.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=text, images=[image], return_tensors="pt").to(device)
pixel_values = inputs.pixel_values
input_ids = inputs.input_ids[0].tolist()
skip = len(input_ids)  # the output repeats the input"""
# The image's patch grid and where its tokens are: the model's 3-D rotary positions need both.
SNIPPET_GENERATE_KWARGS = "image_grid_thw=inputs.image_grid_thw, mm_token_type_ids=inputs.mm_token_type_ids"
