"""The Flickr30k layout as Kaggle ships it: ``results.csv`` (``image_name| comment_number| comment``, 5 rows per
image) and the ``flickr30k_images/`` folder; one split."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import MALFORMED_ROW, DataReport
from .core import ImageTable, add_image_row, caption_stats, first_existing, layout_mismatch, read_lines, relative_id

logger = logging.getLogger(__name__)

NAME = "flickr30k"
DETECTION = (
    "results.csv (pipe-separated image_name, comment_number, comment) and a flickr30k_images/ folder (Kaggle; "
    "results.csv may sit inside it, the images in flickr30k_images/flickr30k_images/)"
)
RESULTS_FILES = ("results.csv", "flickr30k_images/results.csv")
IMAGE_DIRS = ("flickr30k_images/flickr30k_images", "flickr30k_images")  # Kaggle's zip nests the folder
HEADER = "image_name| comment_number| comment"
# Kaggle's file has a row without its second separator ("2199200615.jpg| 4   A dog runs across the grass ."):
# the number, whitespace, then the comment.
NUMBER_THEN_COMMENT = re.compile(r"\d+\s+(?P<comment>\S.*)")


def detect(root: Path) -> bool:
    return _files(root) is not None


def load(root: Path, data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """Every image in the train split (validation and test are carved from it by image)."""
    files = _files(root)
    if files is None:
        raise layout_mismatch(root, NAME, DETECTION)
    results, image_dir = files
    where = f"--dataset_dir {root} ({relative_id(results, root)})"
    stats = caption_stats(where, data_args, report)
    table = ImageTable(where, f"Expected the images in {image_dir}; fix --dataset_dir.", stats)
    folder = relative_id(image_dir, root)
    recovered = []
    for number, line in read_lines(results, stats, header=HEADER):
        location = f"{where}, line {number}"
        name, comment, was_recovered = parse_row(line)
        if name is None:
            stats.note(MALFORMED_ROW, location, line)
            logger.warning("%s: skipped; expected 'image| number| comment', got %r.", location, line[:80])
            continue
        if was_recovered:
            recovered.append(number)
        add_image_row(table, root, f"{folder}/{name}", [comment], location)
    if recovered:
        logger.warning(
            "%s: %d row(s) lack the separator after the comment number (lines %s); their captions were recovered.",
            where,
            len(recovered),
            ", ".join(map(str, recovered[:5])) + (", ..." if len(recovered) > 5 else ""),
        )
    return {"train": table.to_dataset()}


def parse_row(line: str) -> tuple[str | None, str | None, bool]:
    """(image name, comment, whether the comment was recovered from a row missing its second separator); the
    name is None when the row cannot be read."""
    fields = [field.strip() for field in line.split("|", 2)]
    if len(fields) == 3 and fields[0]:
        return fields[0], fields[2], False
    match = NUMBER_THEN_COMMENT.fullmatch(fields[1]) if len(fields) == 2 and fields[0] else None
    if match is None:
        return None, None, False
    return fields[0], match["comment"], True


def _files(root: Path) -> tuple[Path, Path] | None:
    """(results.csv, image folder), or None."""
    results = first_existing(root / name for name in RESULTS_FILES)
    images = first_existing((root / name for name in IMAGE_DIRS), folder=True)
    return (results, images) if results is not None and images is not None else None
