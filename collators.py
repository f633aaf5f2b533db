"""Batches for training (image + caption -> pixel_values, input_ids, attention_mask, labels) and for generation
(image + prompt only), laid out exactly as each family's ``generate`` expects its prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from captioning.families import ModelFamily
from captioning.grouping import unique_images
from captioning.layout import IGNORE_INDEX, CaptionLayout

__all__ = ["IGNORE_INDEX", "CaptionCollator", "CaptionLayout", "build_layout"]


def build_layout(family: ModelFamily, config: PretrainedConfig, processor, prompt: str | None = None) -> CaptionLayout:
    """The family's caption layout for this checkpoint (captioning/layout.py shows each kind's sequences).

    ``processor`` is the checkpoint's processor; its tokenizer alone does for families that build their layout
    from the tokenizer (``layout_from_processor`` False). ``prompt`` None is the family's default prompt."""
    tokenizer: PreTrainedTokenizerBase = getattr(processor, "tokenizer", processor)
    return family.build_layout(config, processor if family.layout_from_processor else tokenizer, family.prompt(prompt))


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
        self.group_images = group_images and layout.image_grouping

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "caption" in rows[0]:
            return self.collate_training(rows)
        return self.collate_generation(rows)

    def pixel_values(self, rows: list[dict]) -> torch.Tensor:
        images = [row["image"] for row in rows]
        if isinstance(images[0], torch.Tensor):  # preprocessed once (captioning/image_cache.py): already resized
            pixels = self.image_processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"]
        else:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if pixels.dim() == 5 and pixels.shape[0] == 1 and pixels.shape[1] == len(images) > 1:
            # Image processors with a per-row image axis (Idefics3, SmolVLM) read a flat list as one row of many
            # images: give each row its own image, (B, 1, 3, H, W).
            pixels = pixels.transpose(0, 1).contiguous()
        return pixels

    def collate_training(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = [self.layout.caption_prefix + row["caption"] for row in rows]
        caption_ids = self.tokenizer(
            captions, add_special_tokens=False, truncation=True, max_length=self.max_caption_length
        )["input_ids"]
        batch = self._pad_rows([self.layout.training_row(ids) for ids in caption_ids])
        if self.group_images:
            first_rows, batch["image_group"] = unique_images([row["image_index"] for row in rows])
            batch["pixel_values"] = self.pixel_values([rows[i] for i in first_rows])
        else:
            batch["pixel_values"] = self.pixel_values(rows)
        return batch

    def collate_generation(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompt = {
            key: torch.tensor([ids] * len(rows), dtype=torch.long) for key, ids in self.layout.generation_row().items()
        }
        return {
            "pixel_values": self.pixel_values(rows),
            **prompt,
            "image_index": torch.tensor([row["image_index"] for row in rows], dtype=torch.long),
        }

    def _pad_rows(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad every token-level input to the batch's longest row; ``attention_mask`` marks the real tokens
        of ``input_ids``."""
        values = self.layout.padding_values()
        batch = {}
        for key in rows[0]:
            batch[key], mask = _pad([row[key] for row in rows], values.get(key, 0))
            if key == "input_ids":
                batch["attention_mask"] = mask
        return batch


def _pad(sequences: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; returns the padded ids and the 0/1 mask of real positions."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask
