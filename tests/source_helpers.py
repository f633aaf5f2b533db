"""Helpers shared by the layout tests (tests/test_source_*.py): arguments for a --dataset_dir, what splits hold."""

from __future__ import annotations

from pathlib import Path

import datasets

from captioning.arguments import DataArguments


def args(root: Path, **kwargs) -> DataArguments:
    """DataArguments for ``--dataset_dir root``, nothing carved out of train unless asked."""
    kwargs.setdefault("validation_split_percentage", 0)
    kwargs.setdefault("test_split_percentage", 0)
    return DataArguments(dataset_dir=str(root), **kwargs)


def ids(split: datasets.Dataset) -> list[str]:
    return split.select_columns(["image_id"])[:]["image_id"]


def references(splits: dict[str, datasets.Dataset]) -> dict[str, list[str]]:
    return {row["image_id"]: row["references"] for split in splits.values() for row in split}
