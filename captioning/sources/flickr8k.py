"""The Flickr8k layout, both distributions: Kaggle's ``captions.txt`` (csv) + ``Images/`` (one split), and the
original ``Flickr8k.token.txt`` with the official ``Flickr_8k.{train,dev,test}Images.txt`` split lists."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import (
    ImageTable,
    add_image_row,
    caption_stats,
    first_existing,
    layout_mismatch,
    read_csv_records,
    read_lines,
    relative_id,
)

logger = logging.getLogger(__name__)

NAME = "flickr8k"
DETECTION = (
    "captions.txt next to an Images/ folder (Kaggle), or Flickr8k.token.txt (at the top or in Flickr8k_text/) "
    "with Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/ (original; Flickr_8k.trainImages.txt, devImages, "
    "testImages give the splits)"
)
TEXT_DIRS = (".", "Flickr8k_text")
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")  # "Flicker": the original archive's spelling
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def detect(root: Path) -> bool:
    return _original_files(root) is not None or _is_kaggle(root)


def load(root: Path, data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """The original distribution when its files are there (its split lists are honoured), else Kaggle's."""
    original = _original_files(root)
    if original is not None:
        return load_original(root, *original, data_args, report=report)
    if _is_kaggle(root):
        return load_kaggle(root, data_args, report=report)
    raise layout_mismatch(root, NAME, DETECTION)


# --------------------------------------------------------------------------------------------------------------
# Kaggle: captions.txt + Images/
# --------------------------------------------------------------------------------------------------------------


def _is_kaggle(root: Path) -> bool:
    return (root / "captions.txt").is_file() and (root / "Images").is_dir()


def load_kaggle(
    root: Path, data_args: DataArguments, *, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """``captions.txt``: csv with an ``image,caption`` header, one row per caption; one split (train).

    Quoted captions lose their csv quotes; an unquoted caption holding commas keeps all of its text.
    """
    where = f"--dataset_dir {root} (captions.txt)"
    stats = caption_stats(where, data_args, report)
    table = ImageTable(where, f"Expected the images in {root / 'Images'}; fix --dataset_dir.", stats)
    for number, fields in read_csv_records(root / "captions.txt", where, stats, header="image,caption"):
        name = fields[0].strip()
        if len(fields) < 2 or not name:
            raise ValueError(f"{where}, line {number}: expected 'image,caption', got {','.join(fields)[:80]!r}.")
        # csv splits an unquoted caption at its commas: join its fields back
        add_image_row(table, root, f"Images/{name}", [",".join(fields[1:])], f"{where}, line {number}")
    return {"train": table.to_dataset()}


# --------------------------------------------------------------------------------------------------------------
# Original: Flickr8k.token.txt, the split lists, Flicker8k_Dataset/
# --------------------------------------------------------------------------------------------------------------


def _original_files(root: Path) -> tuple[Path, Path] | None:
    """(token file, image folder) of the original distribution, or None."""
    token = first_existing(root / folder / TOKEN_FILE for folder in TEXT_DIRS)
    images = first_existing((root / folder for folder in IMAGE_DIRS), folder=True)
    return (token, images) if token is not None and images is not None else None


def load_original(
    root: Path, token: Path, image_dir: Path, data_args: DataArguments, *, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """``Flickr8k.token.txt`` lines ``<image>#<n><TAB><caption>``, split by the lists next to it.

    Images in no list are left out (the real token file has 8,092 images, the lists 8,000); without any list,
    every image is train.
    """
    where = f"--dataset_dir {root} ({relative_id(token, root)})"
    stats = caption_stats(where, data_args, report)
    table = ImageTable(where, f"Expected the images in {image_dir}; fix --dataset_dir.", stats)
    folder = relative_id(image_dir, root)
    for number, line in read_lines(token, stats):
        name, tab, caption = line.partition("\t")
        name = name.rpartition("#")[0] or name  # 1000268201_693b08cb0e.jpg#0 -> 1000268201_693b08cb0e.jpg
        if not tab or not name.strip():
            raise ValueError(f"{where}, line {number}: expected '<image>#<n><TAB><caption>', got {line[:80]!r}.")
        add_image_row(table, root, f"{folder}/{name.strip()}", [caption], f"{where}, line {number}")
    images = table.to_dataset()
    split_of = read_split_lists(token.parent)
    if not split_of:
        logger.info("%s: no %s; every image is train.", where, " / ".join(SPLIT_LISTS.values()))
        return {"train": images}
    return split_images(images, split_of, where)


def read_split_lists(folder: Path) -> dict[str, str]:
    """Image file name -> split, from the split lists present in ``folder``; an image in two lists is an error."""
    split_of: dict[str, str] = {}
    for split, file_name in SPLIT_LISTS.items():
        path = folder / file_name
        if not path.is_file():
            continue
        for name in _read_names(path):
            if split_of.setdefault(name, split) != split:
                raise ValueError(
                    f"--dataset_dir: {name} is in both {SPLIT_LISTS[split_of[name]]} and {file_name} (in "
                    f"{folder}); an image belongs to one split. Fix the split lists."
                )
    return split_of


def _read_names(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"--dataset_dir: {path} is not UTF-8 ({error}); expected one file name per line.") from error


def split_images(images: datasets.Dataset, split_of: dict[str, str], where: str) -> dict[str, datasets.Dataset]:
    """The images of each listed split, in token-file order; images in no list are left out (logged)."""
    rows: dict[str, list[int]] = {split: [] for split in SPLIT_LISTS}
    unlisted = 0
    for row, image_id in enumerate(images.select_columns(["image_id"])[:]["image_id"]):
        split = split_of.get(image_id.rpartition("/")[2])
        if split is None:
            unlisted += 1
        else:
            rows[split].append(row)
    if unlisted:
        logger.warning("%s: left out %d image(s) that are in none of the split lists.", where, unlisted)
    if not any(rows.values()):
        raise ValueError(
            f"{where}: none of its images is in the split lists {', '.join(SPLIT_LISTS.values())}; fix the lists, "
            "or remove them to use every image as train."
        )
    return {split: images.select(indices) for split, indices in rows.items() if indices}
