"""Batches for training (image + caption -> pixel_values, input_ids, attention_mask, labels) and for generation
(image + prompt only), laid out exactly as each family's ``generate`` expects its prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from captioning.families import BLIP_DECODER, DECODER_ONLY, ENCODER_DECODER, ModelFamily
from captioning.grouping import unique_images

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CaptionLayout:
    """Token ids that frame a caption for one family, and the sequences built from them.

    ``blip_decoder``    input  [DEC] prompt caption [SEP]          labels  -100 -100.. caption [SEP]
                        (``generate`` writes [DEC] at position 0 too; the tokenizer's [CLS] is never used)
    ``decoder_only``    input  <image>*Q BOS prompt caption EOS    labels  -100 ....... caption EOS
    ``encoder_decoder`` input  <image>*Q prompt EOS                labels  caption EOS
    Padding goes to the right, with ``pad_id`` in the inputs and -100 in the labels.
    """

    kind: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    prompt_ids: tuple[int, ...] = ()
    image_token_id: int | None = None
    num_image_tokens: int = 0
    caption_prefix: str = ""  # text put before each caption so that it tokenizes as a continuation of the prompt

    @property
    def image_tokens(self) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens if self.num_image_tokens else []

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

    def generation_prompt(self) -> list[int]:
        """``input_ids`` handed to ``generate``: the image placeholders and the prompt, never a caption."""
        prompt = list(self.prompt_ids)
        if self.kind == BLIP_DECODER:
            # BLIP's generate drops the last position (the tokenizer's [SEP]) and writes [DEC] at position 0.
            return [self.bos_id, *prompt, self.eos_id]
        if self.kind == DECODER_ONLY:
            return [*self.image_tokens, self.bos_id, *prompt]
        return [*self.image_tokens, *prompt, self.eos_id]

    @property
    def generated_prefix_length(self) -> int:
        """Positions at the start of ``generate``'s output that repeat the prompt (cut before decoding)."""
        if self.kind == BLIP_DECODER:
            return 1 + len(self.prompt_ids)
        if self.kind == DECODER_ONLY:
            return self.num_image_tokens + 1 + len(self.prompt_ids)
        return 0

    def decode(self, sequences, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Captions from ``generate`` outputs (rows may be right-padded with -100 or the pad id)."""
        captions = []
        for row in sequences:
            ids = [int(token) for token in list(row)[self.generated_prefix_length :] if int(token) >= 0]
            captions.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        return captions


def build_layout(
    family: ModelFamily, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, prompt: str = ""
) -> CaptionLayout:
    """Read the framing token ids from the model config (the ids ``generate`` uses), not from the tokenizer."""
    text = config.text_config
    caption_prefix = ""
    if prompt and _spaces_matter(tokenizer):
        # Byte-level BPE (OPT): "a photo of" + " dog" tokenizes like running text; "a photo of " + "dog" would not.
        prompt, caption_prefix = prompt.rstrip(), " "
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else ()
    if family.layout == BLIP_DECODER:
        return CaptionLayout(
            kind=BLIP_DECODER,
            bos_id=text.bos_token_id,
            eos_id=text.sep_token_id,
            pad_id=text.pad_token_id,
            prompt_ids=prompt_ids,
            caption_prefix=caption_prefix,
        )
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(
            "--model_name_or_path: this BLIP-2 checkpoint has no image_token_index in its config (it predates "
            "transformers' image-token layout); use a current revision of the checkpoint."
        )
    common = dict(
        eos_id=text.eos_token_id,
        pad_id=text.pad_token_id,
        prompt_ids=prompt_ids,
        image_token_id=image_token_id,
        num_image_tokens=config.num_query_tokens,
        caption_prefix=caption_prefix,
    )
    if family.layout == DECODER_ONLY:
        return CaptionLayout(kind=DECODER_ONLY, bos_id=text.bos_token_id, **common)
    if family.layout == ENCODER_DECODER:
        return CaptionLayout(kind=ENCODER_DECODER, bos_id=None, **common)
    raise ValueError(f"unknown layout {family.layout!r}")


def _spaces_matter(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when a leading space changes the tokens (byte-level BPE), False for WordPiece and SentencePiece."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    spaced = tokenizer(" a", add_special_tokens=False)["input_ids"]
    return plain != spaced


class CaptionCollator:
    """Turns dataset rows into model batches; one instance serves training, evaluation loss and generation.

    Training rows ``{"image": PIL.Image, "caption": str, ...}`` give
        ``pixel_values`` float (B, 3, H, W), ``input_ids`` / ``attention_mask`` long (B, L), ``labels`` long (B, L'),
        padded to the longest caption of the batch, padding and prompt set to -100 in ``labels``.
    With ``group_images`` (training rows then carry ``image_index``), each image is processed once:
        ``pixel_values`` (U, 3, H, W) for the U distinct images and ``image_group`` long (B,), the position of each
        row's image among them (see captioning/grouping.py).
    ``image`` may also be the uint8 (3, H, W) pixels of the preprocessing cache, already at the model's size.
    Generation rows ``{"image": PIL.Image, "image_index": int}`` (no caption) give
        ``pixel_values``, the prompt as ``input_ids`` / ``attention_mask`` (B, P) and ``image_index`` long (B,).
    """

    def __init__(
        self,
        image_processor,
        tokenizer: PreTrainedTokenizerBase,
        layout: CaptionLayout,
        max_caption_length: int = 64,
        group_images: bool = False,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_caption_length = max_caption_length
        self.group_images = group_images

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "caption" in rows[0]:
            return self.collate_training(rows)
        return self.collate_generation(rows)

    def pixel_values(self, rows: list[dict]) -> torch.Tensor:
        images = [row["image"] for row in rows]
        if isinstance(images[0], torch.Tensor):  # preprocessed once (captioning/image_cache.py): already resized
            return self.image_processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def collate_training(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = [self.layout.caption_prefix + row["caption"] for row in rows]
        caption_ids = self.tokenizer(
            captions, add_special_tokens=False, truncation=True, max_length=self.max_caption_length
        )["input_ids"]
        inputs, labels = zip(*(self.layout.training_sequence(ids) for ids in caption_ids), strict=True)
        input_ids, attention_mask = _pad(inputs, self.layout.pad_id)
        label_ids, _ = _pad(labels, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
        if self.group_images:
            first_rows, batch["image_group"] = unique_images([row["image_index"] for row in rows])
            batch["pixel_values"] = self.pixel_values([rows[i] for i in first_rows])
        else:
            batch["pixel_values"] = self.pixel_values(rows)
        return batch

    def collate_generation(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompt = torch.tensor([self.layout.generation_prompt()] * len(rows), dtype=torch.long)
        return {
            "pixel_values": self.pixel_values(rows),
            "input_ids": prompt,
            "attention_mask": torch.ones_like(prompt),
            "image_index": torch.tensor([row["image_index"] for row in rows], dtype=torch.long),
        }


def _pad(sequences: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; returns the padded ids and the 0/1 mask of real positions."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask
