"""Parquet and webdataset shards (``--train_file "shards/train-*.tar"``): images inside the files, one row per image,
read with a ``datasets`` builder; ``captioning.streaming`` streams the same files."""

from __future__ import annotations

import glob
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import dataset_to_images

# Shards with the images inside, read with a datasets builder: parquet files, webdataset tar files.
SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}


def shard_builder(file: str) -> str | None:
    """The datasets builder for parquet / webdataset shard files (a path or a glob), or None for csv/jsonl."""
    return SHARD_BUILDERS.get(Path(file).suffix.lower())


def shard_files(file: str, flag: str) -> list[str]:
    """The files a path or glob names, sorted; an error naming the flag when there are none."""
    files = sorted(glob.glob(file)) if glob.has_magic(file) else ([file] if Path(file).is_file() else [])
    if not files:
        raise ValueError(f"{flag} {file}: no such file (globs like shards/train-*.tar are allowed).")
    return files


def load_shard_split(
    file: str, flag: str, data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> datasets.Dataset:
    """Parquet or webdataset shards of one split, as a per-image dataset (each row is one image)."""
    builder = shard_builder(file)
    loaded = datasets.load_dataset(
        builder, data_files={"split": shard_files(file, flag)}, split="split", cache_dir=cache_dir
    )
    return dataset_to_images(loaded, data_args, f"{flag} {file}", report=report)
