"""Image-grouped training: the captions of one image share a batch and one pass of the (frozen) vision encoder."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ImageGroupedBatchSampler(Sampler[list[int]]):
    """Batches of caption rows in which up to ``captions_per_image`` captions of an image sit together.

    Each epoch (seeded by ``seed + epoch``): the rows of every image are shuffled and cut into chunks of
    ``captions_per_image``, the chunks are shuffled, and the flat sequence is cut into batches of ``batch_size``.
    Every row appears exactly once per epoch. ``image_index[i]`` is the image of row ``i``.
    """

    def __init__(
        self, image_index: np.ndarray, batch_size: int, captions_per_image: int, seed: int = 0, drop_last: bool = False
    ):
        if batch_size < 1 or captions_per_image < 1:
            raise ValueError("batch_size and captions_per_image must be at least 1")
        self.image_index = np.asarray(image_index)
        self.batch_size = batch_size
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        order = np.argsort(self.image_index, kind="stable")
        boundaries = np.flatnonzero(np.diff(self.image_index[order])) + 1
        self._rows_by_image = np.split(order, boundaries) if len(order) else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rows(self) -> np.ndarray:
        """This epoch's row order."""
        rng = np.random.default_rng(self.seed + self.epoch)
        chunks = []
        for rows in self._rows_by_image:
            rows = rng.permutation(rows)
            chunks += [
                rows[start : start + self.captions_per_image] for start in range(0, len(rows), self.captions_per_image)
            ]
        if not chunks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.rows()
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        count = len(self.image_index) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)


def unique_images(image_index: list[int]) -> tuple[list[int], torch.Tensor]:
    """Rows holding the first caption of each image, and for every row the position of its image among them."""
    position: dict[int, int] = {}
    first_rows: list[int] = []
    group: list[int] = []
    for row, image in enumerate(image_index):
        if image not in position:
            position[image] = len(first_rows)
            first_rows.append(row)
        group.append(position[image])
    return first_rows, torch.tensor(group, dtype=torch.long)


@contextlib.contextmanager
def expand_image_features(module: torch.nn.Module, image_group: torch.Tensor):
    """While active, ``module``'s output (computed once per unique image) is repeated for every caption row.

    ``module`` is where the image side ends: BLIP's vision model (its last_hidden_state feeds the text decoder's
    cross-attention), BLIP-2's language projection (the query embeddings put into the language model's input).
    Gradients flow back through the indexing, summed over the captions of an image.
    """

    def hook(_module, _args, output):
        group = image_group.to(_first_tensor(output).device)
        if isinstance(output, torch.Tensor):
            return output.index_select(0, group)
        for key, value in output.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                output[key] = value.index_select(0, group)
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return next(value for value in output.values() if isinstance(value, torch.Tensor))


@contextlib.contextmanager
def shared_image_features(
    model: torch.nn.Module, inputs: dict, image_group: torch.Tensor, layout, feature_module: torch.nn.Module | None
):
    """Inputs of a grouped batch whose image features are computed once per image and used by each of its
    captions, the way the layout's family takes them (``layout.grouping_by``). ``model`` is the model (PEFT or
    plain) without DDP's wrapper; ``feature_module`` is its family's ``image_feature_module``."""
    if layout.grouping_by == "encoder_outputs":
        yield with_image_features(model, inputs, image_group, layout)
    else:
        with expand_image_features(feature_module, image_group), once_per_image(model, layout, image_group):
            yield inputs


@contextlib.contextmanager
def once_per_image(model: torch.nn.Module, layout, image_group: torch.Tensor):
    """While active, the modules named by ``layout.once_per_image`` (BLIP's cross-attention key and value
    projections, whose input is the image features repeated for every caption) run on one row per image, and their
    output is repeated for the image's rows: the same values, computed once instead of once per caption.

    A LoRA-wrapped module shares its base layer only: the adapter branch still runs per row, so its dropout draws a
    mask per caption as without sharing. Gradients flow back through the repetition, summed over the captions.
    Not with activation checkpointing: a checkpointed layer runs its forward again during backward, after these
    hooks are gone, and would compute other shapes than it saved."""
    if not layout.once_per_image or activation_checkpointing(model):
        yield
        return
    first_rows = torch.tensor(unique_first_rows(image_group.tolist()), dtype=torch.long)
    handles = []

    def select_first_rows(_module, args):
        return (args[0].index_select(0, first_rows.to(args[0].device)), *args[1:])

    def repeat_per_row(_module, _args, output):
        return output.index_select(0, image_group.to(output.device))

    for name, module in model.named_modules():
        if name.endswith(layout.once_per_image):
            shared = getattr(module, "base_layer", module)  # peft's LoRA layer: its frozen base
            handles.append(shared.register_forward_pre_hook(select_first_rows))
            handles.append(shared.register_forward_hook(repeat_per_row))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether some layer of ``model`` recomputes its forward in backward (transformers' gradient checkpointing)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def unique_first_rows(image_group: list[int]) -> list[int]:
    """For each image position 0..G-1 of ``image_group`` (every row's image), its first row."""
    first: dict[int, int] = {}
    for row, image in enumerate(image_group):
        first.setdefault(image, row)
    return [first[image] for image in range(len(first))]


def with_image_features(model: torch.nn.Module, inputs: dict, image_group: torch.Tensor, layout) -> dict:
    """``inputs`` of a grouped batch (images once, rows pointing at them by ``image_group``) rewritten for a model
    that accepts precomputed image features (``mm_encoder_outputs``, the chat VLMs): ``get_image_features`` runs once
    per image, its per-image features are repeated for each caption row, and the layout's ``row_image_keys`` (Qwen's
    ``image_grid_thw``, which the rotary positions read per placeholder) are given per row. Gradients flow back
    through the repetition, summed over the captions of an image."""
    inputs = dict(inputs)
    images = {key: inputs.pop(key) for key in layout.image_input_keys}
    features = model.get_image_features(**images, return_dict=True)
    group = image_group.to(images["pixel_values"].device)
    inputs["mm_encoder_outputs"] = {"image": _repeat_per_row(features, group.tolist())}
    for key in layout.row_image_keys:
        inputs[key] = images[key].index_select(0, group.to(images[key].device))
    return inputs


def _repeat_per_row(features, rows: list[int]):
    """A copy of ``get_image_features``' output whose per-image sequences (``pooler_output``; Qwen3-VL's
    ``deepstack_features``, one per layer) hold each row's image, in row order."""
    repeated = copy.copy(features)
    for key, value in features.items():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            repeated[key] = tuple(value[row] for row in rows)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            repeated[key] = [tuple(per_image[row] for row in rows) for per_image in value]
    return repeated
