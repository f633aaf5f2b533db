"""The Karpathy layout: a split file ``dataset_coco.json`` / ``dataset_flickr8k.json`` / ... whose "split" field gives
the splits (restval joins train); image paths are ``<filepath>/<filename>`` under --image_dir (default: its folder)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import SPLITS, ImageTable, add_image_row, caption_stats, read_json

logger = logging.getLogger(__name__)

NAME = "karpathy"
DETECTION = (
    "a Karpathy split file dataset_*.json (dataset_coco.json, dataset_flickr8k.json, ...) with an 'images' list, "
    "or --dataset_dir set to that file (images under --image_dir)"
)
SPLIT_OF = {"train": "train", "restval": "train", "val": "validation", "test": "test"}

# detect() has to parse the split file (hundreds of MB for COCO); load() takes the parsed document from here.
_detected: dict[Path, tuple[Path, dict]] = {}


def detect(root: Path) -> bool:
    found = find_split_file(root, required=False)
    if found is not None:
        _detected[root] = found
    return found is not None


def load(root: Path, data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """The train, validation and test splits of the split file (entries of any other split are skipped)."""
    path, document = _detected.pop(root, None) or find_split_file(root, required=True)
    image_root = Path(data_args.image_dir) if data_args.image_dir else (path.parent if path.is_file() else path)
    where = f"--dataset_dir {data_args.dataset_dir} ({path.name})"
    hint = (
        f"Image paths are {image_root}/<filepath>/<filename>; set --image_dir to the folder that holds them "
        "(default: --dataset_dir)."
    )
    tables = {}
    for split in SPLITS:
        split_where = f"{where}, {split} split"
        tables[split] = ImageTable(split_where, hint, caption_stats(split_where, data_args, report, register=False))
    unknown = 0
    for number, entry in enumerate(document["images"]):
        split = SPLIT_OF.get(str(entry.get("split")))
        if split is None:
            unknown += 1
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"{where}, images[{number}]: no 'filename'; is this a Karpathy split file?")
        image_id = (Path(entry.get("filepath") or "") / filename).as_posix()
        sentences = entry.get("sentences") or []
        table = tables[split]
        table.stats.rows += 1
        raws = [sentence.get("raw") if isinstance(sentence, dict) else sentence for sentence in sentences]
        add_image_row(table, image_root, image_id, raws, f"{table.where}, images[{number}] ({image_id})")
    if unknown:
        logger.warning("%s: skipped %d image(s) whose split is not train, restval, val or test.", where, unknown)
    used = {split: table for split, table in tables.items() if table.paths}
    if report is not None:
        report.sources.update({table.where: table.stats for table in used.values()})
    return {split: table.to_dataset() for split, table in used.items()}


def find_split_file(root: Path, *, required: bool) -> tuple[Path, dict] | None:
    """The Karpathy split file (path, parsed JSON): ``root`` itself or the one ``dataset_*.json`` in it."""
    candidates = [root] if root.is_file() else sorted(root.glob("dataset_*.json"))
    found = []
    for path in candidates:
        document = read_json(path, "--dataset_dir")
        if isinstance(document, dict) and isinstance(document.get("images"), list):
            found.append((path, document))
    if len(found) > 1:
        names = ", ".join(path.name for path, _ in found)
        raise ValueError(f"--dataset_dir {root}: several Karpathy split files ({names}); point --dataset_dir at one.")
    if found:
        return found[0]
    if required:
        raise ValueError(
            f"--dataset_dir {root}: no Karpathy split file (dataset_*.json with an 'images' list); point "
            "--dataset_dir at the file or its folder, or set another --dataset_layout."
        )
    return None
