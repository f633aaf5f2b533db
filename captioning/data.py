"""Caption data: the configured source (``captioning.sources``) loaded into per-image splits, the missing validation
and test splits carved out of train by image (never by caption row), and the two views the trainer reads: caption
pairs for training, images with all their references for evaluation."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .arguments import DataArguments
from .image_cache import ImageCache
from .images import describe, load_image
from .scan import DataReport
from .sources import describe_source, load_source_splits
from .sources.core import SPLITS, read_columns

logger = logging.getLogger(__name__)


def load_caption_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Load the configured source and return per-image splits, keys among "train", "validation", "test".

    Every split has the columns ``image`` (path or ``Image(decode=False)`` value), ``references`` (list of
    captions) and ``image_id``. No image is opened here (``captioning.scan.scan_splits`` checks them next).
    Captions that are empty, whitespace only, null or NaN are dropped, duplicate (image, caption) rows collapse,
    rows that are not UTF-8 are skipped and images left without a caption are dropped: all counted, per source, in
    ``report`` when one is given (which also gets the size of every split).
    """
    report = report if report is not None else DataReport()
    splits = load_source_splits(data_args, cache_dir=cache_dir, report=report)
    if not splits:
        raise ValueError(f"{describe_source(data_args)}: found no train, validation or test split.")
    splits = split_by_image(splits, data_args)
    splits = limit_samples(splits, data_args)
    for name in SPLITS:
        if name in splits:
            captions = sum(len(refs) for refs in read_columns(splits[name], ["references"])["references"])
            logger.info("%s split: %d images, %d captions", name, len(splits[name]), captions)
            entry = report.split(name)
            entry.images_total = entry.images_kept = len(splits[name])
            entry.captions = captions
    return {name: splits[name] for name in SPLITS if name in splits}


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def split_by_image(splits: dict[str, datasets.Dataset], data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """Carve the missing test, then validation split out of train, by image (never by caption row)."""
    percentages = {"test": data_args.test_split_percentage, "validation": data_args.validation_split_percentage}
    for split, percent in percentages.items():
        if not 0 <= percent < 100:
            raise ValueError(f"--{_percent_flag(split)} {percent}: must be at least 0 and below 100.")
    wanted = {split: pct for split, pct in percentages.items() if split not in splits and pct > 0}
    if "train" not in splits or not wanted:
        return splits
    train = splits["train"]
    n = len(train)
    sizes = {split: _carve_size(n, pct) for split, pct in wanted.items()}
    flags = " and ".join(f"--{_percent_flag(split)} {pct:g}" for split, pct in wanted.items())
    if any(size == 0 for size in sizes.values()) or sum(sizes.values()) >= n:
        raise ValueError(
            f"The training split has {n} images, too few to hold out {flags} by image "
            f"({', '.join(f'{split}: {size}' for split, size in sizes.items())} images). Lower the percentages, "
            "set them to 0, or give validation/test data."
        )
    order = np.random.default_rng(data_args.split_seed).permutation(n)
    carved, start = {}, 0
    for split in ("test", "validation"):
        if split in sizes:
            carved[split] = np.sort(order[start : start + sizes[split]])
            start += sizes[split]
    result = dict(splits)
    result["train"] = train.select(np.sort(order[start:]).tolist())
    for split, indices in carved.items():
        result[split] = train.select(indices.tolist())
        logger.info("Held out %d of %d training images as the %s split.", len(indices), n, split)
    return result


def _carve_size(n: int, percent: float) -> int:
    size = int(round(n * percent / 100))
    return max(size, 1) if percent > 0 and n >= 3 else size


def _percent_flag(split: str) -> str:
    return f"{split}_split_percentage"


def limit_samples(splits: dict[str, datasets.Dataset], data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """Apply ``--max_train_samples``/``--max_eval_samples``/``--max_predict_samples``: the first N images."""
    limits = {
        "train": ("max_train_samples", data_args.max_train_samples),
        "validation": ("max_eval_samples", data_args.max_eval_samples),
        "test": ("max_predict_samples", data_args.max_predict_samples),
    }
    result = dict(splits)
    for split, (flag, limit) in limits.items():
        if limit is None:
            continue
        if limit < 1:
            raise ValueError(f"--{flag} {limit}: must be a positive number of images (or unset for all).")
        if split in result and limit < len(result[split]):
            result[split] = result[split].select(range(limit))
    return result


# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


def _view_image(images: datasets.Dataset, cache: ImageCache | None, index: int) -> Image.Image | torch.Tensor:
    """The decoded image of a row, or its preprocessed uint8 pixels (3, H, W) when the split is cached."""
    if cache is not None:
        return cache[index]
    return _load_view_image(images[index]["image"], index)


class UnreadableImageError(OSError):
    """An image that cannot be decoded reached a view: the image scan was skipped, or the file changed since."""


def _load_view_image(value: Any, index: int) -> Image.Image:
    """The views stay strict (``scan_splits`` removes bad images before training), but name the file they fail on."""
    try:
        return load_image(value)
    except Exception as error:
        raise UnreadableImageError(
            f"Image {describe(value)} (row {index} of its split) cannot be decoded ({type(error).__name__}: "
            f"{error}). The image scan (--scan_images, on by default) removes such images before training."
        ) from error


@dataclasses.dataclass(frozen=True)
class CachedRecord:
    """An image's record in the feature cache (captioning/feature_cache.py), read when a batch needs it: a grouped
    batch reads each image once, not once per caption row."""

    store: Any
    index: int

    def load(self) -> dict:
        return self.store[self.index]


def cached_image(features, index: int) -> dict[str, Any]:
    """The row fields of an image from the feature cache: its record of features (``CachedRecord``) and, where
    placeholders vary per image, their count."""
    row = {"image_features": CachedRecord(features, index)}
    count = features.image_token_count(index)
    if count is not None:
        row["image_token_count"] = count
    return row


class CaptionPairs(torch.utils.data.Dataset):
    """Training view: one row per (image, caption) pair of a per-image dataset.

    ``image_index[i]`` is the per-image row of pair ``i`` and ``caption_index[i]`` which of its references it is;
    the pairs of one image are contiguous, in reference order. An image that cannot be decoded raises
    ``UnreadableImageError`` (give it a dataset that went through ``scan_splits``).
    """

    def __init__(self, images: datasets.Dataset, cache: ImageCache | None = None, augmentation=None, features=None):
        if (cache is not None or features is not None) and augmentation is not None:
            raise ValueError("Training-image augmentation crops the decoded images: give no preprocessing cache.")
        self.images = images
        self.cache = cache  # resized uint8 pixels of ``images`` (captioning/image_cache.py), or None
        self.augmentation = augmentation  # PIL image -> PIL image (captioning/augmentation.py), or None
        self.features = features  # cached image features (captioning/feature_cache.py): rows carry no image
        self._references = images.select_columns(["references"])
        counts = np.array([len(refs) for refs in read_columns(images, ["references"])["references"]], dtype=np.int64)
        self.image_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.caption_index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_index = int(self.image_index[i])
        caption = self._references[image_index]["references"][int(self.caption_index[i])]
        if self.features is not None:
            return {**cached_image(self.features, image_index), "caption": caption, "image_index": image_index}
        image = _view_image(self.images, self.cache, image_index)
        return {
            "image": image if self.augmentation is None else self.augmentation(image),
            "caption": caption,
            "image_index": image_index,
        }


class CaptionImages(torch.utils.data.Dataset):
    """Evaluation view: one row per image, carrying no caption (its references stay in ``self.references``).

    An image that cannot be decoded raises ``UnreadableImageError``, as in ``CaptionPairs``.
    """

    def __init__(self, images: datasets.Dataset, cache: ImageCache | None = None, features=None):
        self.images = images
        self.cache = cache
        self.features = features  # cached image features (captioning/feature_cache.py): rows carry no image
        columns = read_columns(images, ["references", "image_id"])
        self.references: list[list[str]] = columns["references"]
        self.image_ids: list[str] = columns["image_id"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if self.features is not None:
            return {**cached_image(self.features, i), "image_index": i}
        return {"image": _view_image(self.images, self.cache, i), "image_index": i}
