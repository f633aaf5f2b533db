"""--train_file / --validation_file / --test_file: csv or jsonl tables of image paths and captions (or shards,
handed to ``shards``)."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import load_table_file
from .shards import load_shard_split, shard_builder


def load_file_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Load the given split files: csv/jsonl tables of image paths, or parquet/webdataset shards holding images."""
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    splits = {}
    for split, file in files.items():
        if not file:
            continue
        flag = f"--{split}_file"
        if shard_builder(file):
            splits[split] = load_shard_split(file, flag, data_args, cache_dir=cache_dir, report=report)
            continue
        hint = f"Image paths are relative to the folder of {file}; fix the paths or the file given to {flag}."
        splits[split] = load_table_file(Path(file), data_args, f"{flag} {file}", hint, report=report)
    return splits
