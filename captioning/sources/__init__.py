"""Caption sources, one module each over a shared core (``core``): the Hub (``hub``), split files (``files``,
``shards``) and the ``--dataset_dir`` layouts, registered below in detection order. This file picks the source."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from . import coco, files, flickr8k, flickr30k, hub, imagefolder, karpathy

logger = logging.getLogger(__name__)

# The --dataset_dir layouts, in the order auto-detection tries them. Each module has NAME, DETECTION (its rule, in
# words: shown when nothing is detected, and in the README), detect(root) and load(root, data_args, report=...).
LAYOUTS = (karpathy, coco, flickr30k, flickr8k, imagefolder)
SOURCE_FLAGS = {
    "dataset_name": "--dataset_name",
    "files": "--train_file/--validation_file/--test_file",
    "dataset_dir": "--dataset_dir",
}


def load_source_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """The per-image splits of the one configured source, as it gives them (nothing carved yet)."""
    source = check_source(data_args)
    if source == "dataset_name":
        return hub.load_hub_splits(data_args, cache_dir=cache_dir, report=report)
    if source == "files":
        return files.load_file_splits(data_args, cache_dir=cache_dir, report=report)
    return load_dir_splits(data_args, report=report)


def check_source(data_args: DataArguments) -> str:
    """Return which source is configured ("dataset_name", "files" or "dataset_dir"); exactly one must be."""
    given = []
    if data_args.dataset_name:
        given.append("dataset_name")
    if data_args.train_file or data_args.validation_file or data_args.test_file:
        given.append("files")
    if data_args.dataset_dir:
        given.append("dataset_dir")
    flags = "--dataset_name, --dataset_dir or --train_file/--validation_file/--test_file"
    if not given:
        raise ValueError(f"No data source given: set one of {flags}.")
    if len(given) > 1:
        raise ValueError(
            f"Several data sources given ({', '.join(SOURCE_FLAGS[g] for g in given)}): set only one of {flags}."
        )
    if data_args.image_dir and given[0] != "dataset_dir":
        logger.warning("--image_dir is only used with a Karpathy --dataset_dir; ignored.")
    if data_args.image_id_column and given[0] != "dataset_name":
        logger.warning("--image_id_column is only used with --dataset_name; local rows are grouped by image path.")
    return given[0]


def describe_source(data_args: DataArguments) -> str:
    """The configured source as error messages name it, e.g. ``--dataset_dir data/flickr8k``."""
    if data_args.dataset_name:
        return f"--dataset_name {data_args.dataset_name}"
    if data_args.dataset_dir:
        return f"--dataset_dir {data_args.dataset_dir}"
    return SOURCE_FLAGS["files"]


def load_dir_splits(data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """Load ``--dataset_dir`` in its ``--dataset_layout`` (detected when "auto")."""
    root = Path(data_args.dataset_dir)
    if not root.exists():
        raise ValueError(f"--dataset_dir {root}: no such file or folder.")
    if data_args.dataset_layout == "auto":
        layout = detect_layout(root)
        logger.info("--dataset_dir %s: detected the %s layout.", root, layout.NAME)
    else:
        layout = layout_named(data_args.dataset_layout)
    if data_args.image_dir and layout is not karpathy:
        logger.warning("--image_dir is only used with the karpathy layout; ignored for %s.", layout.NAME)
    return layout.load(root, data_args, report=report)


def detect_layout(root: Path):
    """The first layout of ``LAYOUTS`` whose files are in ``root``; an error listing every rule when none is."""
    for layout in LAYOUTS:
        if layout.detect(root):
            return layout
    rules = "; ".join(f"{layout.NAME}: {layout.DETECTION}" for layout in LAYOUTS)
    raise ValueError(
        f"--dataset_dir {root}: could not detect the dataset layout. Looked for, in this order: {rules}. Fix "
        f"--dataset_dir or set --dataset_layout to one of {', '.join(layout_names())}."
    )


def layout_named(name: str):
    """The layout module called ``name`` (``--dataset_layout``)."""
    for layout in LAYOUTS:
        if name == layout.NAME:
            return layout
    raise ValueError(f"--dataset_layout {name!r}: unknown; use auto, {', '.join(layout_names())}.")


def layout_names() -> list[str]:
    return [layout.NAME for layout in LAYOUTS]
