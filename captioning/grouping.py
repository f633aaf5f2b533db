"""Image-grouped training: the captions of one image share a batch and one pass of the (frozen) vision encoder."""

from __future__ import annotations

import contextlib
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
