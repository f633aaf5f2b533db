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
    ``image`` may also be the uint8 (3, H, W) pixels of the preprocessing cache, already at the model's size. Rows
    with ``image_features`` instead (the feature cache) give ``image_features``, the list of their B or U records
    (dicts of tensors, captioning/feature_cache.py), instead of pixels.
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

    def image_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The image processor's outputs for the rows' images that the layout's batches carry (``pixel_values``;
        Qwen's ``image_grid_thw``)."""
        return self.processed_images(rows)[0]

    def processed_images(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], list | None]:
        """``image_inputs`` and what each image's prompt depends on (``layout.image_token_counts``, read from all
        the image processor returned: SmolVLM's tile grids are no model input)."""
        if "image_features" in rows[0]:  # cached (captioning/feature_cache.py): the image side's output, per image
            records = [row["image_features"].load() for row in rows]  # captioning.data.CachedRecord
            # Inputs the language side reads per image (Qwen's image_grid_thw) are stored in the records.
            inputs = {
                key: torch.cat([record.pop(key) for record in records])
                for key in self.layout.image_input_keys
                if key in records[0]
            }
            counts = [row["image_token_count"] for row in rows] if "image_token_count" in rows[0] else None
            return {"image_features": records, **inputs}, counts
        images = [row["image"] for row in rows]
        if isinstance(images[0], torch.Tensor):  # preprocessed once (captioning/image_cache.py): already resized
            output = self.layout.process_images(self.image_processor, images, do_resize=False)
        else:
            output = self.layout.process_images(self.image_processor, images)
        inputs = {key: output[key] for key in self.layout.image_input_keys}
        pixels = inputs["pixel_values"]
        if pixels.dim() == 5 and pixels.shape[0] == 1 and pixels.shape[1] == len(images) > 1:
            # Image processors with a per-row image axis (Idefics3, SmolVLM) read a flat list as one row of many
            # images: give each row its own image, (B, 1, 3, H, W).
            inputs["pixel_values"] = pixels.transpose(0, 1).contiguous()
        return inputs, self.layout.image_token_counts({**output, **inputs})

    def pixel_values(self, rows: list[dict]) -> torch.Tensor:
        return self.image_inputs(rows)["pixel_values"]

    def collate_training(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = [self.layout.caption_prefix + row["caption"] for row in rows]
        # Cut here, not by the tokenizer's truncation: a fast tokenizer keeps truncation settings, and the processor
        # saved with the run would then cut every later prompt (e.g. Qwen's hundreds of image tokens) to this length.
        caption_ids = [
            ids[: self.max_caption_length] for ids in self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        ]
        if self.group_images:
            first_rows, image_group = unique_images([row["image_index"] for row in rows])
            images, counts = self.processed_images([rows[i] for i in first_rows])
        else:
            image_group, (images, counts) = None, self.processed_images(rows)
        if counts is None:
            counts = [None] * len(rows)
        elif image_group is not None:
            counts = [counts[image] for image in image_group.tolist()]
        batch = self._pad_rows([self.layout.training_row(ids, n) for ids, n in zip(caption_ids, counts, strict=True)])
        if image_group is not None:
            batch["image_group"] = image_group
        return {**batch, **images}

    def collate_generation(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Prompts of different lengths (images with different numbers of placeholders) are left-padded, so that
        every row's new tokens start at the same position."""
        images, counts = self.processed_images(rows)
        counts = counts or [None] * len(rows)
        prompts = self._pad_rows([self.layout.generation_row(n) for n in counts], side="left")
        image_index = torch.tensor([row["image_index"] for row in rows], dtype=torch.long)
        return {**images, **prompts, "image_index": image_index}

    def pad_rows(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Token rows built elsewhere (SCST's sampled captions, captioning/scst.py), right-padded as training rows."""
        return self._pad_rows(rows)

    def _pad_rows(self, rows: list[dict[str, list[int]]], side: str = "right") -> dict[str, torch.Tensor]:
        """Pad every token-level input to the batch's longest row (``attention_mask`` padded with 0)."""
        values = self.layout.padding_values()
        rows = [_with_mask(row) for row in rows]
        return {key: _pad([row[key] for row in rows], values.get(key, 0), side) for key in rows[0]}


def _with_mask(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """The row's inputs; ``attention_mask`` marks the real tokens of ``input_ids`` where the row has none."""
    if "attention_mask" in row:
        return row
    return {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), **row}


def _pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad to the longest sequence, on the right (training) or on the left (generation prompts)."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            target = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
            ids[row, target] = torch.tensor(sequence, dtype=torch.long)
    return ids
