"""--streaming: train on a stream of images (Hub datasets, parquet or webdataset shards) too large to load.

The training split stays an ``datasets.IterableDataset``: shuffled through a buffer, expanded into (image, caption)
rows, decoded in the DataLoader workers (an unreadable image is logged and skipped, never fatal), and split across
processes by shard. Evaluation needs a fixed set (CIDEr-D's document frequencies come from the whole set), so the
validation and test images are read into memory: the first ``--max_eval_samples`` / ``--max_predict_samples`` images
of their streams, or, when the source has no such split, images held out from the head of the training stream.
"""

from __future__ import annotations

import logging
import random

import datasets

from captioning.arguments import DataArguments
from captioning.images import describe, load_image
from captioning.sources.core import (
    REFERENCES_FEATURE,
    SPLIT_ALIASES,
    clean_captions,
    is_image_struct,
    resolve_caption_columns,
    resolve_image_column,
)
from captioning.sources.shards import shard_builder, shard_files

logger = logging.getLogger(__name__)

DEFAULT_HELD_OUT_IMAGES = 500  # validation / test images when --max_eval_samples / --max_predict_samples are unset
IMAGE_FEATURES = datasets.Features(
    {"image": datasets.Image(decode=False), "references": REFERENCES_FEATURE, "image_id": datasets.Value("string")}
)


def load_streams(data_args: DataArguments, *, cache_dir: str | None = None) -> dict[str, datasets.IterableDataset]:
    """The source's splits as streams (keys among train / validation / test)."""
    if data_args.dataset_name:
        loaded = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, streaming=True
        )
        streams = {}
        for name, stream in loaded.items():
            target = SPLIT_ALIASES.get(str(name).lower())
            if target and target not in streams:
                streams[target] = stream
        return streams
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    streams = {}
    for split, file in files.items():
        if not file:
            continue
        flag = f"--{split}_file"
        builder = shard_builder(file)
        if builder is None:
            raise ValueError(
                f"{flag} {file}: --streaming reads parquet (.parquet) or webdataset (.tar) shards, or a Hub dataset "
                "(--dataset_name); csv/jsonl files of image paths load without --streaming."
            )
        loaded = datasets.load_dataset(
            builder, data_files={"split": shard_files(file, flag)}, split="split", streaming=True, cache_dir=cache_dir
        )
        streams[split] = loaded
    return streams


def to_images(stream: datasets.IterableDataset, data_args: DataArguments, where: str) -> datasets.IterableDataset:
    """Rows of ``image`` (undecoded), ``references`` (cleaned captions) and ``image_id``; each row is one image."""
    columns = stream.column_names or list(next(iter(stream)).keys())
    image_column = resolve_image_column(columns, data_args.image_column, where)
    caption_columns = resolve_caption_columns(columns, data_args.caption_column, where)
    features = stream.features or {}
    feature = features.get(image_column)
    if isinstance(feature, datasets.Image) or is_image_struct(feature):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    key_column = "__key__" if "__key__" in columns else None

    def convert(row: dict, index: int) -> dict:
        captions = clean_captions((row[column] for column in caption_columns), f"{where}, row {index}")
        image_id = str(row[key_column]) if key_column else str(index)
        return {"image": row[image_column], "references": captions, "image_id": image_id}

    images = stream.map(convert, with_indices=True, remove_columns=columns)
    return images.filter(lambda row: len(row["references"]) > 0)


def take_images(stream: datasets.IterableDataset, count: int) -> datasets.Dataset:
    """The first ``count`` images of a stream, in memory (for evaluation)."""
    rows = list(stream.take(count))
    if not rows:
        raise ValueError("the evaluation stream has no image with a caption")
    return datasets.Dataset.from_list(rows, features=IMAGE_FEATURES)


def training_rows(images: datasets.IterableDataset, *, seed: int, buffer_size: int) -> datasets.IterableDataset:
    """Shuffled images expanded into (image, caption) rows and decoded; unreadable images are skipped."""
    shuffled = images.shuffle(seed=seed, buffer_size=buffer_size)
    return shuffled.map(expand_and_decode, batched=True, batch_size=16, remove_columns=["references", "image_id"])


def expand_and_decode(batch: dict) -> dict:
    """One row per caption; the captions of an image stay next to each other (they share a vision pass when the
    collator groups images), with an ``image_index`` unique to this image."""
    base = random.getrandbits(48) << 8  # rows of one image carry the same index; other batches get other bases
    rows: dict[str, list] = {"image": [], "caption": [], "image_index": []}
    for offset, (raw, references, image_id) in enumerate(
        zip(batch["image"], batch["references"], batch["image_id"], strict=True)
    ):
        try:
            image = load_image(raw)
        except Exception as error:  # noqa: BLE001 - one bad image must never end a long run
            logger.warning("Skipping unreadable image %s (%s): %s", image_id, describe(raw), error)
            continue
        for caption in references:
            rows["image"].append(image)
            rows["caption"].append(caption)
            rows["image_index"].append(base + offset)
    return rows


def load_streaming_splits(
    data_args: DataArguments, *, seed: int, cache_dir: str | None = None
) -> tuple[datasets.IterableDataset | None, dict[str, datasets.Dataset]]:
    """(training stream of caption rows, in-memory per-image validation / test splits)."""
    streams = {
        name: to_images(stream, data_args, f"stream {name}")
        for name, stream in load_streams(data_args, cache_dir=cache_dir).items()
    }
    held_out: dict[str, datasets.Dataset] = {}
    train = streams.get("train")
    for split, count_flag, percent in (
        ("validation", data_args.max_eval_samples, data_args.validation_split_percentage),
        ("test", data_args.max_predict_samples, data_args.test_split_percentage),
    ):
        count = count_flag or DEFAULT_HELD_OUT_IMAGES
        if split in streams:
            held_out[split] = take_images(streams[split], count)
        elif train is not None and percent > 0:
            # No such split: the first images of the training stream, which training then skips.
            held_out[split] = take_images(train, count)
            train = train.skip(count)
            logger.info("Held out the first %d images of the training stream as the %s split.", count, split)
    for split, images in held_out.items():
        logger.info("%s split: %d images (in memory)", split, len(images))
    if train is not None:
        train = training_rows(train, seed=seed, buffer_size=data_args.shuffle_buffer_size)
        logger.info("train split: streamed (%d shards)", train.n_shards)
    return train, held_out
