"""How a caption is laid out around the image and the prompt, as token ids: one ``CaptionLayout`` per family kind.

A family module (``captioning/families/``) builds its layout from the checkpoint's config and tokenizer; the
generic collator (``collators.py``) asks the layout for each training row and each generation prompt, and the
trainer for how labels line up with logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

BLIP_DECODER = "blip_decoder"  # BERT-style text decoder; [DEC] at position 0, [SEP] ends the caption
DECODER_ONLY = "decoder_only"  # BLIP-2 + OPT: query-token placeholders, BOS, prompt, caption, EOS in one sequence
ENCODER_DECODER = (
    "encoder_decoder"  # BLIP-2 + Flan-T5: placeholders and prompt go to the encoder, caption is the target
)


@dataclass(frozen=True)
class CaptionLayout:
    """Token ids that frame a caption for one family, and the sequences built from them.

    ``blip_decoder``    input  [DEC] prompt caption [SEP]          labels  -100 -100.. caption [SEP]
                        (``generate`` writes [DEC] at position 0 too; the tokenizer's [CLS] is never used)
    ``decoder_only``    input  <image>*Q BOS prompt caption EOS    labels  -100 ....... caption EOS
    ``encoder_decoder`` input  <image>*Q prompt EOS                labels  caption EOS
    Padding goes to the right, with ``pad_id`` in the inputs and -100 in the labels. A family whose rows carry
    more (e.g. ``token_type_ids``) subclasses this and overrides ``training_row`` / ``generation_row`` /
    ``padding_values``.
    """

    kind: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    prompt_ids: tuple[int, ...] = ()
    image_token_id: int | None = None
    num_image_tokens: int = 0
    caption_prefix: str = ""  # text put before each caption so that it tokenizes as a continuation of the prompt
    # False where captions of one image cannot share one image pass (captioning/grouping.py).
    image_grouping: bool = True
    # How grouped batches share an image's features (captioning/grouping.py): "hook" repeats the output of the
    # family's image_feature_module for each caption (BLIP, BLIP-2, Florence-2, PaliGemma); "encoder_outputs" runs
    # the model's get_image_features once per image and hands its per-image features, repeated, to the forward as
    # ``mm_encoder_outputs`` (chat VLMs, whose features are split per image inside the model).
    grouping_by: str = "hook"
    # The image processor's outputs a batch carries (Qwen adds image_grid_thw), and among them those the language
    # side also reads once per image placeholder (rows of grouped batches get their image's entry).
    image_input_keys: tuple[str, ...] = ("pixel_values",)
    row_image_keys: tuple[str, ...] = ()
    # Modules (name suffixes) that read nothing but the image features a grouped batch repeats per caption: in a
    # grouped batch they run once per image (captioning/grouping.py once_per_image). BLIP: the text decoder's
    # cross-attention key and value projections.
    once_per_image: tuple[str, ...] = ()

    @property
    def image_tokens(self) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens if self.num_image_tokens else []

    @property
    def predicts_next_token(self) -> bool:
        """True when position t of the logits predicts label t + 1 (one sequence); False when the labels are the
        decoder's own targets, aligned with the logits (encoder-decoder)."""
        return self.kind != ENCODER_DECODER

    def training_sequence(self, caption_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one training row, before padding."""
        caption = [*caption_ids, self.eos_id]
        prompt = list(self.prompt_ids)
        if self.kind == BLIP_DECODER:
            prefix = [self.bos_id, *prompt]
        elif self.kind == DECODER_ONLY:
            prefix = [*self.image_tokens, self.bos_id, *prompt]
        else:
            return self.generation_prompt(), caption
        return prefix + caption, [IGNORE_INDEX] * len(prefix) + caption

    def process_images(self, image_processor, images: list, **kwargs) -> dict:
        """The image processor's outputs for a batch's images, one image per row (``kwargs``: e.g. ``do_resize``).
        A layout whose prompts depend on more than ``image_input_keys`` asks for it here (SmolVLM's tile grid)."""
        return image_processor(images=images, return_tensors="pt", **kwargs)

    def image_token_counts(self, image_inputs: dict) -> list | None:
        """What each image's placeholders depend on, per image of a batch's ``image_inputs`` (all that
        ``process_images`` returned), where they vary with the image: a count (Qwen's dynamic resolution) or a key
        the layout maps to prompt ids (SmolVLM's tile grid); None where every image gets ``num_image_tokens``."""
        return None

    def training_row(self, caption_ids: Sequence[int], num_image_tokens: int | None = None) -> dict[str, list[int]]:
        """Every token-level input of one training row, before padding (``attention_mask`` is added by padding).
        ``num_image_tokens``: this row's image entry from ``image_token_counts`` (None: fixed)."""
        input_ids, labels = self.training_sequence(caption_ids)
        return {"input_ids": input_ids, "labels": labels}

    def generation_prompt(self) -> list[int]:
        """``input_ids`` handed to ``generate``: the image placeholders and the prompt, never a caption."""
        prompt = list(self.prompt_ids)
        if self.kind == BLIP_DECODER:
            # BLIP's generate drops the last position (the tokenizer's [SEP]) and writes [DEC] at position 0.
            return [self.bos_id, *prompt, self.eos_id]
        if self.kind == DECODER_ONLY:
            return [*self.image_tokens, self.bos_id, *prompt]
        return [*self.image_tokens, *prompt, self.eos_id]

    def generation_row(self, num_image_tokens: int | None = None) -> dict[str, list[int]]:
        """Every token-level input ``generate`` gets for one image (the same for every image of a fixed-size
        layout; generation batches are left-padded where rows differ)."""
        prompt = self.generation_prompt()
        return {"input_ids": prompt, "attention_mask": [1] * len(prompt)}

    def padding_values(self) -> dict[str, int]:
        """The value each token-level input is right-padded with (inputs not named here: 0)."""
        return {"input_ids": self.pad_id, "labels": IGNORE_INDEX}

    @property
    def generated_prefix_length(self) -> int:
        """Positions at the start of ``generate``'s output that are not the caption (cut before decoding): the
        prompt a decoder repeats, or the decoder start token an encoder-decoder's output begins with."""
        if self.kind == BLIP_DECODER:
            return 1 + len(self.prompt_ids)
        if self.kind == DECODER_ONLY:
            return self.num_image_tokens + 1 + len(self.prompt_ids)
        return 1

    @property
    def forced_first_token(self) -> int | None:
        """A token the labels put before every caption that ``generate`` writes first too (Florence-2's ``<s>``):
        sampling for SCST forces it there, and it is not part of the sampled caption. None for most layouts."""
        return None

    def caption_tokens(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The positions of ``generate``'s output after those that repeat the prompt, for a batch whose prompt was
        ``input_ids`` (a left-padded batch of prompts of different lengths is cut at its width)."""
        return sequences[:, self.generated_prefix_length :]

    def decode_captions(self, tokens, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Captions from ``caption_tokens`` rows (which may be right-padded with -100 or the pad id)."""
        captions = []
        for row in tokens:
            ids = [int(token) for token in list(row) if int(token) >= 0]
            captions.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        return captions

    def decode(self, sequences, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Captions from whole ``generate`` outputs of a fixed-size layout's prompts."""
        return self.decode_captions([list(row)[self.generated_prefix_length :] for row in sequences], tokenizer)


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[tuple[int, ...], str]:
    """``(prompt ids, caption prefix)``: with byte-level BPE (OPT) "a photo of" + " dog" tokenizes like running
    text while "a photo of " + "dog" would not, so the prompt loses its trailing space and captions gain one."""
    caption_prefix = ""
    if prompt and spaces_matter(tokenizer):
        prompt, caption_prefix = prompt.rstrip(), " "
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else ()
    return prompt_ids, caption_prefix


def spaces_matter(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when a leading space changes the tokens (byte-level BPE), False for WordPiece and SentencePiece."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    spaced = tokenizer(" a", add_special_tokens=False)["input_ids"]
    return plain != spaced
