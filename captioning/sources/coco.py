"""The COCO captions layout as downloaded: ``annotations/captions_{train,val}2017.json`` (or 2014) in COCO format,
images in ``train2017/`` and ``val2017/``. The val file is the validation split, or the test split (--coco_val_as)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

from ..arguments import DataArguments
from ..scan import UNKNOWN_IMAGE, DataReport
from .core import ImageTable, add_image_row, caption_stats, first_existing, layout_mismatch, read_json, relative_id

logger = logging.getLogger(__name__)

NAME = "coco"
DETECTION = (
    "annotations/captions_train2017.json and/or annotations/captions_val2017.json (or 2014), the images in "
    "train2017/ and val2017/ (COCO as downloaded)"
)
YEARS = ("2017", "2014")  # when both are present, the first
VAL_SPLITS = ("validation", "test")  # --coco_val_as


def detect(root: Path) -> bool:
    return bool(_years(root))


def load(root: Path, data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """The train file as the train split, the val file as --coco_val_as (a missing split is carved from train)."""
    if data_args.coco_val_as not in VAL_SPLITS:
        raise ValueError(f"--coco_val_as {data_args.coco_val_as!r}: use validation or test.")
    years = _years(root)
    if not years:
        raise layout_mismatch(root, NAME, DETECTION)
    year = years[0]
    if len(years) > 1:
        logger.info("--dataset_dir %s: has COCO %s; using %s.", root, " and ".join(years), year)
    splits = {}
    for part, split in (("train", "train"), ("val", data_args.coco_val_as)):
        path = root / "annotations" / f"captions_{part}{year}.json"
        if path.is_file():
            splits[split] = load_captions_file(path, root, f"{part}{year}", data_args, report=report)
    return splits


def load_captions_file(
    path: Path, root: Path, folder: str, data_args: DataArguments, *, report: DataReport | None = None
) -> datasets.Dataset:
    """One COCO captions file as a per-image dataset, images in ``images`` order; image ids ``<folder>/<file>``.

    Images without a caption are dropped and captions of an image id not in ``images`` skipped (both counted).
    """
    where = f"--dataset_dir {root} ({relative_id(path, root)})"
    images, annotations = _read_coco(path, where)
    image_dir = first_existing((root / folder, root / "images" / folder), folder=True) or root / folder
    prefix = relative_id(image_dir, root)
    stats = caption_stats(where, data_args, report)
    stats.rows = len(annotations)
    hint = f"Expected the images in {image_dir} ({folder}/ next to annotations/); fix --dataset_dir."
    table = ImageTable(where, hint, stats)
    image_ids = {}
    for number, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{where}, images[{number}]: expected an object with 'id' and 'file_name'.")
        image_ids[image["id"]] = image_id = f"{prefix}/{image['file_name']}"
        add_image_row(table, root, image_id, [], where)
    unknown = []
    for number, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise ValueError(f"{where}, annotations[{number}]: expected an object with 'image_id' and 'caption'.")
        location = f"{where}, annotations[{number}]"
        image_id = image_ids.get(annotation.get("image_id"))
        if image_id is None:
            unknown.append(annotation.get("image_id"))
            stats.note(UNKNOWN_IMAGE, location, annotation.get("image_id"))
            continue
        add_image_row(table, root, image_id, [annotation.get("caption")], location)
    if unknown:
        logger.warning(
            "%s: skipped %d caption(s) whose image_id is not in 'images' (e.g. %s).", where, len(unknown), unknown[0]
        )
    return table.to_dataset()


def _read_coco(path: Path, where: str) -> tuple[list[Any], list[Any]]:
    document = read_json(path, where)
    images = document.get("images") if isinstance(document, dict) else None
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(
            f"{where}: expected a COCO captions file, an object with 'images' and 'annotations' lists; point "
            "--dataset_dir at the folder holding annotations/captions_train2017.json."
        )
    return images, annotations


def _years(root: Path) -> list[str]:
    """The COCO years with a captions file in ``root/annotations``, newest first."""
    folder = root / "annotations"
    return [
        year for year in YEARS if any((folder / f"captions_{part}{year}.json").is_file() for part in ("train", "val"))
    ]
