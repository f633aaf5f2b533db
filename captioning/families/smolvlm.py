"""SmolVLM / SmolVLM2 (HuggingFaceTB/SmolVLM2-*, HuggingFaceTB/SmolVLM-*): a SigLIP vision tower whose patch features
a pixel-shuffle ``connector`` projects into the ``<image>`` placeholders of a Llama chat model. Captions are the
assistant's answer in the checkpoint's own chat template, built through ``processor.apply_chat_template``:

    input_ids   <|im_start|>User:<fake><global-img><image>*N<fake>prompt<end_of_utterance>\\nAssistant:
                caption <end_of_utterance> \\n
    labels      -100 (everything up to and including "Assistant:")  caption <end_of_utterance> -100
Generation gets the same conversation up to ``Assistant:``, and ``generate`` stops at ``<end_of_utterance>``.
With image splitting off (the captioning default) the prompt is the same for every image. With ``--image_splitting``
each image is also cut into a grid of tiles (rows x cols, by its aspect ratio), each tile with its own
``<fake><row_r_col_c><image>*N`` in the prompt before the global image's: prompts differ per grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from PIL import Image
from transformers import PretrainedConfig, SmolVLMForConditionalGeneration

from captioning.families.base import ModelFamily
from captioning.layout import DECODER_ONLY, IGNORE_INDEX, CaptionLayout

DEFAULT_PROMPT = "Describe this image in one sentence."
END_OF_UTTERANCE = "<end_of_utterance>"
_CAPTION = "\x00caption\x00"  # stands for the caption while the template is rendered as text
NOT_SPLIT = (0, 0)  # the image processor's (rows, cols) of an image kept whole: the global image only

Grid = tuple[int, int]


@dataclass(frozen=True)
class ChatLayout(CaptionLayout):
    """``prompt_ids`` is the whole generation prompt (image tokens included); ``suffix_ids`` follow the caption
    (``<end_of_utterance>`` and the template's newline), learnt up to and including ``eos_id``.

    With image splitting, ``grid_prompt_ids`` holds the generation prompt of every tile grid ``(rows, cols)`` the
    image processor may cut an image into (``(0, 0)``: not cut); ``image_token_counts`` then gives each image's grid
    (the image processor's ``rows`` / ``cols``), which ``training_row`` / ``generation_row`` take in place of a
    count. Empty: every image gets ``prompt_ids``."""

    suffix_ids: tuple[int, ...] = ()
    grid_prompt_ids: tuple[tuple[Grid, tuple[int, ...]], ...] = ()

    @cached_property
    def _prompts_by_grid(self) -> dict[Grid, tuple[int, ...]]:
        return dict(self.grid_prompt_ids)

    def prompt_of(self, grid: Grid | None = None) -> tuple[int, ...]:
        """The generation prompt of an image cut into ``grid`` (None: the layout's one prompt)."""
        if grid is None:
            return self.prompt_ids
        try:
            return self._prompts_by_grid[tuple(grid)]
        except KeyError:
            raise ValueError(
                f"the image processor cut an image into a {grid[0]} x {grid[1]} grid of tiles, more than its size "
                f"and max_image_size allowed when the caption layout was built: build the layout after changing them."
            ) from None

    def training_sequence(
        self, caption_ids: Sequence[int], prompt_ids: Sequence[int] | None = None
    ) -> tuple[list[int], list[int]]:
        prompt = list(self.prompt_ids if prompt_ids is None else prompt_ids)
        suffix = list(self.suffix_ids)
        learnt = suffix.index(self.eos_id) + 1 if self.eos_id in suffix else len(suffix)
        input_ids = [*prompt, *caption_ids, *suffix]
        labels = [IGNORE_INDEX] * len(prompt) + [*caption_ids, *suffix[:learnt]]
        return input_ids, labels + [IGNORE_INDEX] * (len(suffix) - learnt)

    def process_images(self, image_processor, images: list, **kwargs) -> dict:
        """One image per conversation: each image in a row of its own, so that ``pixel_values`` are (B, T, 3, H, W)
        with the T sub-images of each image (1 without splitting; tiles then the global image with it), rows with
        fewer padded with all-zero images, which ``get_image_features`` drops. With splitting, the grid of each
        image (``rows`` / ``cols``) comes too."""
        if self.grid_prompt_ids:
            kwargs["return_row_col_info"] = True
        return image_processor(images=[[image] for image in images], return_tensors="pt", **kwargs)

    def image_token_counts(self, image_inputs: dict) -> list[Grid] | None:
        """Each image's tile grid ``(rows, cols)`` with image splitting, else None (one prompt for all)."""
        if not self.grid_prompt_ids:
            return None
        rows, cols = image_inputs["rows"], image_inputs["cols"]
        return [(int(r[0]), int(c[0])) for r, c in zip(rows, cols, strict=True)]

    def training_row(self, caption_ids: Sequence[int], grid: Grid | None = None) -> dict[str, list[int]]:
        input_ids, labels = self.training_sequence(caption_ids, self.prompt_of(grid))
        return {"input_ids": input_ids, "labels": labels}

    def generation_prompt(self) -> list[int]:
        return list(self.prompt_ids)

    def generation_row(self, grid: Grid | None = None) -> dict[str, list[int]]:
        prompt = list(self.prompt_of(grid))
        return {"input_ids": prompt, "attention_mask": [1] * len(prompt)}

    @property
    def generated_prefix_length(self) -> int:
        return len(self.prompt_ids)

    def caption_tokens(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``generate`` repeats the whole (left-padded) prompt: the caption starts at its width."""
        return sequences[:, input_ids.shape[-1] :]


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


def configure_processor(processor, data_args, *, from_run: bool = False) -> None:
    """``--image_splitting`` on the image processor (off unless given, whatever the checkpoint or an earlier run
    saved: ``from_run`` changes nothing): the layout, the collator, the saved processor and so inference
    (caption_images.py, the card's snippet) follow it."""
    image_processor = processor.image_processor
    image_processor.do_image_splitting = bool(data_args.image_splitting)
    if image_processor.do_image_splitting:
        tile_grids(image_processor)  # a processor without longest_edge sizes cannot split: say so now


def tile_grids(image_processor) -> list[Grid]:
    """Every ``(rows, cols)`` the image processor may cut an image into, ``(0, 0)`` (kept whole) first: an image is
    resized to ``size["longest_edge"]``, then up to multiples of ``max_image_size["longest_edge"]``, the tile side."""
    try:
        longest, tile = image_processor.size["longest_edge"], image_processor.max_image_size["longest_edge"]
    except (KeyError, TypeError):
        longest = tile = None
    if not longest or not tile:
        raise ValueError(
            f"--image_splitting: the image processor's size ({image_processor.size}) and max_image_size "
            f"({getattr(image_processor, 'max_image_size', None)}) need a longest_edge to cut images into tiles; "
            "leave --image_splitting out."
        )
    most = math.ceil(longest / tile)
    return [NOT_SPLIT, *((rows, cols) for rows in range(1, most + 1) for cols in range(1, most + 1))]


def chat_prompt_ids(processor, prompt: str, grid: Grid = NOT_SPLIT) -> tuple[int, ...]:
    """The generation prompt's ids for an image cut into ``grid``, as ``processor.apply_chat_template`` gives them for
    such an image: the template's text with the image's placeholder expanded by the processor's own
    ``replace_image_token``, tokenized without a second BOS where the template starts with it."""
    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    image_text = processor.replace_image_token({"rows": [[grid[0]]], "cols": [[grid[1]]]}, image_idx=0)
    tokenizer = processor.tokenizer
    starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    encoded = tokenizer(text.replace(processor.image_token, image_text, 1), add_special_tokens=not starts_with_bos)
    return tuple(int(i) for i in encoded["input_ids"])


def build_layout(config: PretrainedConfig, processor, prompt: str = DEFAULT_PROMPT) -> ChatLayout:
    """Prompt ids from the checkpoint's own processor and chat template; the text around the caption from the
    template rendered with a stand-in. Follows the processor's image splitting (``configure_processor`` sets it
    from --image_splitting): off, the prompt of a blank image is every image's; on, each tile grid has its own."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "apply_chat_template"):
        raise TypeError("SmolVLM's caption layout is built from its processor (SmolVLMProcessor), not a tokenizer")
    grid_prompt_ids: tuple = ()
    if getattr(processor.image_processor, "do_image_splitting", False):
        grids = tile_grids(processor.image_processor)
        grid_prompt_ids = tuple((grid, chat_prompt_ids(processor, prompt, grid)) for grid in grids)
        prompt_ids = grid_prompt_ids[0][1]  # NOT_SPLIT's
    else:
        encoded = processor.apply_chat_template(
            conversation(prompt, Image.new("RGB", (8, 8))), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        prompt_ids = tuple(int(i) for i in encoded["input_ids"][0])
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
        prompt_ids=prompt_ids,
        image_token_id=config.image_token_id,
        num_image_tokens=sum(1 for i in prompt_ids if i == config.image_token_id),
        caption_prefix=caption_prefix,
        suffix_ids=tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]),
        # The model splits the connector's output per row of pixel_values: grouped batches hand it each image's
        # features, computed once, as mm_encoder_outputs (captioning/grouping.py).
        grouping_by="encoder_outputs",
        grid_prompt_ids=grid_prompt_ids,
    )


SNIPPET = """\
# As in training: the chat template's user turn (image + prompt) up to "Assistant:"; the saved processor cuts the
# image into tiles or not (--image_splitting), as it did in training.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
encoded = processor(text=text, images=[image], return_tensors="pt")
pixel_values = encoded.pixel_values.to(device)
input_ids = encoded.input_ids[0].tolist()
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
    chat_template=True,
    configure_processor=configure_processor,
    image_flags=("image_splitting",),
)
