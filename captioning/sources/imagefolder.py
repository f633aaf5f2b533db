"""The image-folder layout: ``metadata.jsonl`` / ``metadata.csv`` (file_name + captions) at the top of
--dataset_dir, or one per split sub-folder (train/, validation/, test/ and their aliases)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import SPLIT_ALIASES, layout_mismatch, load_table_file

logger = logging.getLogger(__name__)

NAME = "imagefolder"
DETECTION = (
    "metadata.jsonl or metadata.csv (file_name + caption columns) at the top, or in train/, validation/ (val/, "
    "valid/, dev/), test/ sub-folders"
)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SPLIT_DIRS = ("train", "validation", "val", "valid", "dev", "test")


def detect(root: Path) -> bool:
    return bool(find_metadata(root))


def load(root: Path, data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """One split per metadata file; ``file_name`` paths are relative to the metadata file's folder."""
    metadata = find_metadata(root)
    if not metadata:
        raise layout_mismatch(root, NAME, DETECTION)
    splits = {}
    for split, path in metadata.items():
        where = f"--dataset_dir {root} ({path.relative_to(root).as_posix()})"
        hint = f"file_name paths are relative to {path.parent}; fix them or --dataset_dir."
        splits[split] = load_table_file(path, data_args, where, hint, report=report)
    return splits


def find_metadata(root: Path) -> dict[str, Path]:
    """Metadata file per split: the top-level one (as train), else those of the split sub-folders."""
    top = _metadata_file(root)
    if top is not None:
        return {"train": top}
    found: dict[str, Path] = {}
    for folder in SPLIT_DIRS:
        metadata = _metadata_file(root / folder)
        if metadata is None:
            continue
        split = SPLIT_ALIASES[folder]
        if split in found:
            logger.warning(
                "--dataset_dir %s: ignoring %s; %s already gave the %s split.", root, metadata, found[split], split
            )
            continue
        found[split] = metadata
    return found


def _metadata_file(folder: Path) -> Path | None:
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise ValueError(f"--dataset_dir: {folder} holds both metadata.jsonl and metadata.csv; keep one.")
    return present[0] if present else None
