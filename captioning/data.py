"""Caption data: load a Hub dataset, csv/jsonl files or a local dataset folder into per-image splits (split by
image, never by caption row), cleaning captions on the way (what is dropped is counted in a ``DataReport``; the
catalogue of bad inputs is in ``captioning.scan``), and the two views the trainer reads: caption pairs for
training, images with all their references for evaluation."""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .arguments import DataArguments
from .image_cache import ImageCache
from .images import describe, load_image
from .scan import DUPLICATE, LONG, NAN_TEXTS, NO_CAPTION, CaptionStats, DataReport

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
DEFAULT_IMAGE_COLUMNS = ("image", "file_name", "image_path", "filepath", "jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "txt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_SPLIT_DIRS = ("train", "validation", "val", "valid", "dev", "test")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
TABLE_EXTENSIONS = (".csv", ".jsonl")
# Shards with the images inside, read with a datasets builder: parquet files, webdataset tar files.
SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}
IMAGES_CHECKED = 20  # a wrong image root is caught from the first images alone; no stat of every file

REFERENCES_FEATURE = datasets.List(datasets.Value("string"))
LOCAL_FEATURES = datasets.Features(
    {"image": datasets.Value("string"), "references": REFERENCES_FEATURE, "image_id": datasets.Value("string")}
)


# --------------------------------------------------------------------------------------------------------------
# Public interface
# --------------------------------------------------------------------------------------------------------------


def load_caption_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Load the configured source and return per-image splits, keys among "train", "validation", "test".

    Every split has the columns ``image`` (path or ``Image(decode=False)`` value), ``references`` (list of
    captions) and ``image_id``. No image is opened here (``captioning.scan.scan_splits`` checks them next).
    Captions that are empty, whitespace only, null or NaN are dropped, duplicate (image, caption) rows collapse,
    rows that are not UTF-8 are skipped and images left without a caption are dropped: all counted, per source, in
    ``report`` when one is given (which also gets the size of every split).
    """
    report = report if report is not None else DataReport()
    source = check_source(data_args)
    if source == "dataset_name":
        splits = load_hub_splits(data_args, cache_dir=cache_dir, report=report)
    elif source == "files":
        splits = load_file_splits(data_args, cache_dir=cache_dir, report=report)
    else:
        splits = load_dir_splits(data_args, report=report)
    if not splits:
        raise ValueError(f"{_describe_source(data_args)}: found no train, validation or test split.")
    splits = split_by_image(splits, data_args)
    splits = limit_samples(splits, data_args)
    for name in SPLITS:
        if name in splits:
            captions = sum(len(refs) for refs in _column(splits[name], "references"))
            logger.info("%s split: %d images, %d captions", name, len(splits[name]), captions)
            entry = report.split(name)
            entry.images_total = entry.images_kept = len(splits[name])
            entry.captions = captions
    return {name: splits[name] for name in SPLITS if name in splits}


def _view_image(images: datasets.Dataset, cache: ImageCache | None, index: int) -> Image.Image | torch.Tensor:
    """The decoded image of a row, or its preprocessed uint8 pixels (3, H, W) when the split is cached."""
    if cache is not None:
        return cache[index]
    return _load_view_image(images[index]["image"], index)


class UnreadableImageError(OSError):
    """An image that cannot be decoded reached a view: the image scan was skipped, or the file changed since."""


def _load_view_image(value: Any, index: int) -> Image.Image:
    """The views stay strict (``scan_splits`` removes bad images before training), but name the file they fail on."""
    try:
        return load_image(value)
    except Exception as error:
        raise UnreadableImageError(
            f"Image {describe(value)} (row {index} of its split) cannot be decoded ({type(error).__name__}: "
            f"{error}). The image scan (--scan_images, on by default) removes such images before training."
        ) from error


class CaptionPairs(torch.utils.data.Dataset):
    """Training view: one row per (image, caption) pair of a per-image dataset.

    ``image_index[i]`` is the per-image row of pair ``i`` and ``caption_index[i]`` which of its references it is;
    the pairs of one image are contiguous, in reference order. An image that cannot be decoded raises
    ``UnreadableImageError`` (give it a dataset that went through ``scan_splits``).
    """

    def __init__(self, images: datasets.Dataset, cache: ImageCache | None = None):
        self.images = images
        self.cache = cache  # resized uint8 pixels of ``images`` (captioning/image_cache.py), or None
        self._references = images.select_columns(["references"])
        counts = np.array([len(refs) for refs in _column(images, "references")], dtype=np.int64)
        self.image_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.caption_index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_index = int(self.image_index[i])
        return {
            "image": _view_image(self.images, self.cache, image_index),
            "caption": self._references[image_index]["references"][int(self.caption_index[i])],
            "image_index": image_index,
        }


class CaptionImages(torch.utils.data.Dataset):
    """Evaluation view: one row per image, carrying no caption (its references stay in ``self.references``).

    An image that cannot be decoded raises ``UnreadableImageError``, as in ``CaptionPairs``.
    """

    def __init__(self, images: datasets.Dataset, cache: ImageCache | None = None):
        self.images = images
        self.cache = cache
        columns = _columns(images, ["references", "image_id"])
        self.references: list[list[str]] = columns["references"]
        self.image_ids: list[str] = columns["image_id"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {"image": _view_image(self.images, self.cache, i), "image_index": i}


# --------------------------------------------------------------------------------------------------------------
# Source selection
# --------------------------------------------------------------------------------------------------------------


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
        names = ", ".join("--train_file/--validation_file/--test_file" if g == "files" else f"--{g}" for g in given)
        raise ValueError(f"Several data sources given ({names}): set only one of {flags}.")
    if data_args.image_dir and given[0] != "dataset_dir":
        logger.warning("--image_dir is only used with a Karpathy --dataset_dir; ignored.")
    if data_args.image_id_column and given[0] != "dataset_name":
        logger.warning("--image_id_column is only used with --dataset_name; local rows are grouped by image path.")
    return given[0]


def _describe_source(data_args: DataArguments) -> str:
    if data_args.dataset_name:
        return f"--dataset_name {data_args.dataset_name}"
    if data_args.dataset_dir:
        return f"--dataset_dir {data_args.dataset_dir}"
    return "--train_file/--validation_file/--test_file"


# --------------------------------------------------------------------------------------------------------------
# Captions and columns
# --------------------------------------------------------------------------------------------------------------


def clean_captions(cells: Iterable[Any], where: str, stats: CaptionStats | None = None) -> list[str]:
    """Flatten caption cells (strings or lists of strings) into stripped captions.

    Dropped, and counted in ``stats``: empty and whitespace-only strings, None (null), NaN and the texts pandas & co.
    write for a missing value (nan, None, null, <NA>). Captions longer than ``stats.long_caption_words`` words are
    kept and counted as long. Any other non-string is an error: the wrong ``--caption_column``.
    """
    captions = []
    for cell in cells:
        values = cell if isinstance(cell, list | tuple) else [cell]
        for value in values:
            reason = caption_drop_reason(value, where)
            if reason is not None:
                if stats is not None:
                    stats.note(reason, where, value)
                continue
            caption = value.strip()
            if stats is not None and stats.is_long(caption):
                stats.note(LONG, where, caption)
            captions.append(caption)
    return captions


def caption_drop_reason(value: Any, where: str) -> str | None:
    """Why a caption value is dropped ("empty", "whitespace_only", "null", "nan"), or None to keep it."""
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: a caption is a {type(value).__name__} ({value!r}); expected a string or a list of "
            "strings. Set --caption_column to the column(s) holding caption text."
        )
    text = value.strip()
    if not text:
        return "whitespace_only" if value else "empty"
    if text.lower() in NAN_TEXTS:
        return "nan"
    return None


def add_caption(references: list[str], caption: str, stats: CaptionStats | None, where: str) -> None:
    """Append ``caption`` unless this image already has it (a duplicate row collapses into one reference)."""
    if caption in references:
        if stats is not None:
            stats.note(DUPLICATE, where, caption)
        return
    references.append(caption)


def parse_csv_caption(cell: str | None) -> str | list | None:
    """A csv caption cell: a plain string, or a JSON list string like ``["a", "b"]``."""
    if cell is None:
        return None
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
    return cell


def resolve_image_column(columns: Sequence[str], image_column: str | None, where: str) -> str:
    """The image column: ``--image_column`` or the first default column present."""
    return _resolve_columns(columns, image_column, DEFAULT_IMAGE_COLUMNS, "--image_column", where)[0]


def resolve_caption_columns(columns: Sequence[str], caption_column: str | None, where: str) -> list[str]:
    """The caption column(s): ``--caption_column`` (comma-separated allowed) or the first default present."""
    return _resolve_columns(columns, caption_column, DEFAULT_CAPTION_COLUMNS, "--caption_column", where)


def _resolve_columns(
    columns: Sequence[str], requested: str | None, defaults: Sequence[str], flag: str, where: str
) -> list[str]:
    available = ", ".join(columns) or "none"
    if requested:
        names = [name.strip() for name in requested.split(",") if name.strip()]
        missing = [name for name in names if name not in columns]
        if missing or not names:
            raise ValueError(
                f"{where} has no column {', '.join(map(repr, missing or [requested]))} (columns: {available}); "
                f"set {flag} to one of them."
            )
        return names
    for name in defaults:
        if name in columns:
            return [name]
    raise ValueError(
        f"{where} has none of the default columns {', '.join(defaults)} (columns: {available}); "
        f"set {flag} to the right one."
    )


def _column(dataset: datasets.Dataset, name: str) -> list:
    return _columns(dataset, [name])[name]


def _columns(dataset: datasets.Dataset, names: list[str]) -> dict[str, list]:
    """Read whole text columns at once, without touching (or decoding) the image column."""
    return dataset.select_columns(names)[:]


# --------------------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------------------


def load_hub_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Load ``--dataset_name`` and turn each train/validation/test split into a per-image dataset."""
    loaded = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits: dict[str, datasets.Dataset] = {}
    for split_name, dataset in loaded.items():
        target = SPLIT_ALIASES.get(str(split_name).lower())
        if target is None:
            logger.info("Ignoring split %r of %s (not train, validation or test).", split_name, data_args.dataset_name)
            continue
        if target in splits:
            logger.warning(
                "Ignoring split %r of %s: another split already gave %s.", split_name, data_args.dataset_name, target
            )
            continue
        where = f"--dataset_name {data_args.dataset_name} (split {split_name!r})"
        splits[target] = hub_split_to_images(dataset, data_args, where, report=report)
    return splits


def hub_split_to_images(
    dataset: datasets.Dataset, data_args: DataArguments, where: str, *, report: DataReport | None = None
) -> datasets.Dataset:
    """One Hub split as a per-image dataset; rows sharing ``--image_id_column`` become one image."""
    columns = dataset.column_names
    image_column = resolve_image_column(columns, data_args.image_column, where)
    caption_columns = resolve_caption_columns(columns, data_args.caption_column, where)
    id_column = data_args.image_id_column
    if id_column and id_column not in columns:
        raise ValueError(
            f"{where} has no column {id_column!r} (columns: {', '.join(columns)}); set --image_id_column to one of "
            "them, or leave it unset when each row is one image."
        )
    feature = dataset.features[image_column]
    is_path = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if is_image_struct(feature):  # {"bytes", "path"} written without datasets' Image metadata (plain parquet)
        feature = datasets.Image(decode=False)
        dataset = dataset.cast_column(image_column, feature)
    if not isinstance(feature, datasets.Image) and not is_path:
        raise ValueError(
            f"{where}: column {image_column!r} holds {feature}, not images; set --image_column to the image column."
        )

    stats = _caption_stats(where, data_args, report)
    stats.rows = len(dataset)
    text = _columns(dataset, list(dict.fromkeys(caption_columns + ([id_column] if id_column else []))))
    keys = [str(value) for value in text[id_column]] if id_column else [str(row) for row in range(len(dataset))]
    first_rows, references, image_ids = _group_rows(keys, text, caption_columns, where, stats)

    keep = [i for i, refs in enumerate(references) if refs]
    _note_captionless(references, [f"row {row}" for row in first_rows], stats)
    _warn_dropped(len(references) - len(keep), where)
    stats.log()
    if not keep:
        raise ValueError(
            f"{where}: no row has a non-empty caption in {', '.join(caption_columns)}; set --caption_column."
        )
    rows = [first_rows[i] for i in keep]
    images = dataset.select_columns([image_column])
    if rows != list(range(len(dataset))):
        images = images.select(rows)
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    if isinstance(feature, datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))
    images = images.add_column("references", [references[i] for i in keep], feature=REFERENCES_FEATURE)
    return images.add_column("image_id", [image_ids[i] for i in keep], feature=datasets.Value("string"))


def is_image_struct(feature) -> bool:
    """A ``{"bytes": binary, "path": ...}`` struct: an image column stored without datasets' Image type."""
    return isinstance(feature, dict) and "bytes" in feature and set(feature) <= {"bytes", "path"}


def _group_rows(
    keys: list[str], text: dict[str, list], caption_columns: list[str], where: str, stats: CaptionStats
) -> tuple[list[int], list[list[str]], list[str]]:
    """Group rows by key in order of first appearance: (first row, references without duplicates, key) per group."""
    group_of: dict[str, int] = {}
    first_rows: list[int] = []
    references: list[list[str]] = []
    for row, key in enumerate(keys):
        location = f"{where}, row {row}"
        captions = clean_captions((text[column][row] for column in caption_columns), location, stats)
        if key not in group_of:
            group_of[key] = len(first_rows)
            first_rows.append(row)
            references.append([])
        image_references = references[group_of[key]]
        for caption in captions:
            add_caption(image_references, caption, stats, location)
    return first_rows, references, list(group_of)


def _caption_stats(
    where: str, data_args: DataArguments, report: DataReport | None, *, register: bool = True
) -> CaptionStats:
    """The caption statistics of one source, registered in ``report`` when there is one (and ``register``)."""
    stats = CaptionStats(where, long_caption_words=data_args.max_caption_length)
    if report is not None:
        stats.max_examples = report.max_examples
        if register:
            report.sources[where] = stats
    return stats


def _note_captionless(references: list[list[str]], names: list[str], stats: CaptionStats) -> None:
    """Count the images left without a caption (they are dropped), and their totals."""
    for refs, name in zip(references, names, strict=True):
        if not refs:
            stats.note(NO_CAPTION, name)
    stats.images = sum(1 for refs in references if refs)
    stats.captions = sum(len(refs) for refs in references)


# --------------------------------------------------------------------------------------------------------------
# Local images grouped by path (csv/jsonl files, image folders, Flickr8k, Karpathy)
# --------------------------------------------------------------------------------------------------------------


class ImageTable:
    """Caption rows of local images, grouped by absolute image path in order of first appearance.

    A caption an image already has is not added again (counted as a duplicate in ``stats``).
    """

    def __init__(self, where: str, root_hint: str, stats: CaptionStats | None = None):
        self.where = where
        self.root_hint = root_hint
        self.stats = stats if stats is not None else CaptionStats(where)
        self.paths: list[str] = []
        self.image_ids: list[str] = []
        self.references: list[list[str]] = []
        self._index: dict[str, int] = {}

    def add(self, path: str, image_id: str, captions: list[str], where: str | None = None) -> None:
        index = self._index.get(path)
        if index is None:
            index = self._index[path] = len(self.paths)
            self.paths.append(path)
            self.image_ids.append(image_id)
            self.references.append([])
        references = self.references[index]
        for caption in captions:
            add_caption(references, caption, self.stats, where or self.where)

    def to_dataset(self) -> datasets.Dataset:
        """The per-image dataset; images without captions are dropped, and a wrong image root is an error."""
        keep = [i for i, refs in enumerate(self.references) if refs]
        _note_captionless(self.references, self.image_ids, self.stats)
        _warn_dropped(len(self.references) - len(keep), self.where)
        self.stats.log()
        if not keep:
            raise ValueError(f"{self.where}: no image has a non-empty caption; check the file or --caption_column.")
        paths = [self.paths[i] for i in keep]
        check_image_root(paths, self.where, self.root_hint)
        mapping = {
            "image": paths,
            "references": [self.references[i] for i in keep],
            "image_id": [self.image_ids[i] for i in keep],
        }
        return datasets.Dataset.from_dict(mapping, features=LOCAL_FEATURES)


def check_image_root(paths: Sequence[str], where: str, hint: str) -> None:
    """Raise if none of the first images exists: the image root is wrong (bad files are found later, not here)."""
    checked = paths[:IMAGES_CHECKED]
    if checked and not any(os.path.isfile(path) for path in checked):
        raise ValueError(f"{where}: none of the first {len(checked)} images exists (e.g. {checked[0]!r}). {hint}")


def _warn_dropped(count: int, where: str) -> None:
    if count:
        logger.warning("%s: dropped %d image(s) with no non-empty caption.", where, count)


Row = tuple[str, dict[str, Any]]  # (where in the file, e.g. "row 3" or "line 7"; the row's cells)


def table_from_rows(
    rows: list[Row],
    columns: list[str],
    root: Path,
    data_args: DataArguments,
    where: str,
    root_hint: str,
    parse_cell=None,
    stats: CaptionStats | None = None,
) -> ImageTable:
    """Group tabular caption rows by image path; relative paths are resolved against ``root``."""
    image_column = resolve_image_column(columns, data_args.image_column, where)
    caption_columns = resolve_caption_columns(columns, data_args.caption_column, where)
    table = ImageTable(where, root_hint, stats)
    for location, row in rows:
        value = row.get(image_column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{where}, {location}: column {image_column!r} must hold an image path, got {value!r}. "
                "Fix the row or set --image_column."
            )
        cells = (row.get(column) for column in caption_columns)
        if parse_cell is not None:
            cells = (parse_cell(cell) for cell in cells)
        path, image_id = _resolve_path(root, value.strip())
        row_where = f"{where}, {location}"
        table.add(path, image_id, clean_captions(cells, row_where, table.stats), row_where)
    return table


def _resolve_path(root: Path, value: str) -> tuple[str, str]:
    """(absolute path, image id): relative paths are joined to ``root``; the id is the path as written, normalized."""
    if os.path.isabs(value):
        return os.path.normpath(value), value
    return os.path.abspath(os.path.join(root, value)), Path(os.path.normpath(value)).as_posix()


def read_table(path: Path, where: str, stats: CaptionStats | None = None) -> tuple[list[str], list[Row]]:
    """Read a csv or jsonl file (decided by extension) into (column names, rows).

    A row holding bytes that are not UTF-8 is skipped and counted in ``stats`` (reason "non_utf8").
    """
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        raise ValueError(
            f"{where}: unsupported extension {path.suffix!r}; give a .csv file or a .jsonl file (one JSON object "
            "per line) of image paths and captions, or .parquet / .tar (webdataset) shards holding the images."
        )
    if not path.is_file():
        raise ValueError(f"{where}: no such file {str(path)!r}.")
    stats = stats if stats is not None else CaptionStats(where)
    columns, rows = _read_csv(path, where, stats) if suffix == ".csv" else _read_jsonl(path, where, stats)
    if not rows:
        raise ValueError(f"{where}: the file has no rows{' that are UTF-8' if stats.counts['non_utf8'] else ''}.")
    return columns, rows


def open_text(path: Path, newline: str | None = None):
    """Open a text file as UTF-8 (BOM allowed), keeping bytes that are not UTF-8 as lone surrogates to find them."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def undecodable(text: str) -> bytes | None:
    """The raw bytes of ``text`` when it holds bytes that were not UTF-8 (read with ``open_text``), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")
    return None


def _read_csv(path: Path, where: str, stats: CaptionStats) -> tuple[list[str], list[Row]]:
    rows = []
    with open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = list(reader.fieldnames or [])
            if any(undecodable(column) for column in columns):
                raise ValueError(
                    f"{where}: the header row is not UTF-8 ({_raw(','.join(columns))}); re-encode the file as UTF-8 "
                    "(e.g. iconv -f cp1252 -t utf-8)."
                )
            for number, row in enumerate(reader, start=1):
                stats.rows += 1
                location = f"row {number} (line {reader.line_num})"
                raw = _undecodable_row(row)
                if raw is not None:
                    stats.note("non_utf8", location, _raw(raw))
                    continue
                rows.append((location, row))
        except csv.Error as error:
            raise ValueError(f"{where}: not valid csv after line {reader.line_num} ({error}).") from error
    return columns, rows


def _undecodable_row(row: dict[str | None, Any]) -> bytes | None:
    cells = [cell for value in row.values() for cell in (value if isinstance(value, list) else [value])]
    return undecodable(",".join(cell for cell in cells if isinstance(cell, str)))


def _raw(value: str | bytes, limit: int = 100) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


def _read_jsonl(path: Path, where: str, stats: CaptionStats) -> tuple[list[str], list[Row]]:
    rows, columns = [], {}
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            stats.rows += 1
            raw = undecodable(line)
            if raw is not None:
                stats.note("non_utf8", f"line {number}", _raw(raw.rstrip()))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}, line {number}: not valid JSON ({error}); expected one object per line."
                ) from error
            if not isinstance(row, dict):
                raise ValueError(f"{where}, line {number}: expected a JSON object, got {type(row).__name__}.")
            columns.update(dict.fromkeys(row))
            rows.append((f"line {number}", row))
    return list(columns), rows


def load_table_file(
    path: Path, data_args: DataArguments, where: str, root_hint: str, *, report: DataReport | None = None
) -> datasets.Dataset:
    """A csv/jsonl file of caption rows as a per-image dataset; image paths are relative to the file's folder."""
    stats = _caption_stats(where, data_args, report)
    columns, rows = read_table(path, where, stats)
    parse_cell = parse_csv_caption if path.suffix.lower() == ".csv" else None
    table = table_from_rows(rows, columns, path.parent, data_args, where, root_hint, parse_cell, stats)
    return table.to_dataset()


# --------------------------------------------------------------------------------------------------------------
# --train_file / --validation_file / --test_file
# --------------------------------------------------------------------------------------------------------------


def shard_builder(file: str) -> str | None:
    """The datasets builder for parquet / webdataset shard files (a path or a glob), or None for csv/jsonl."""
    return SHARD_BUILDERS.get(Path(file).suffix.lower())


def shard_files(file: str, flag: str) -> list[str]:
    """The files a path or glob names, sorted; an error naming the flag when there are none."""
    files = sorted(glob.glob(file)) if glob.has_magic(file) else ([file] if Path(file).is_file() else [])
    if not files:
        raise ValueError(f"{flag} {file}: no such file (globs like shards/train-*.tar are allowed).")
    return files


def load_shard_split(file: str, flag: str, data_args: DataArguments, *, cache_dir=None, report=None):
    """Parquet or webdataset shards of one split, as a per-image dataset (each row is one image)."""
    builder = shard_builder(file)
    loaded = datasets.load_dataset(
        builder, data_files={"split": shard_files(file, flag)}, split="split", cache_dir=cache_dir
    )
    return hub_split_to_images(loaded, data_args, f"{flag} {file}", report=report)


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


# --------------------------------------------------------------------------------------------------------------
# --dataset_dir: Karpathy, Flickr8k, image folder
# --------------------------------------------------------------------------------------------------------------


def load_dir_splits(data_args: DataArguments, *, report: DataReport | None = None) -> dict[str, datasets.Dataset]:
    """Load ``--dataset_dir`` in its ``--dataset_layout`` (detected when "auto")."""
    root = Path(data_args.dataset_dir)
    if not root.exists():
        raise ValueError(f"--dataset_dir {root}: no such file or folder.")
    layout = data_args.dataset_layout
    karpathy = None
    if layout == "auto":
        layout, karpathy = detect_layout(root)
        logger.info("--dataset_dir %s: detected the %s layout.", root, layout)
    elif layout == "karpathy":
        karpathy = find_karpathy_file(root, required=True)
    elif root.is_file():
        raise ValueError(f"--dataset_dir {root} is a file; the {layout} layout needs a folder.")
    if layout == "karpathy":
        return load_karpathy(*karpathy, data_args, report=report)
    if data_args.image_dir:
        logger.warning("--image_dir is only used with the karpathy layout; ignored for %s.", layout)
    if layout == "flickr8k":
        return load_flickr8k(root, data_args, report=report)
    if layout == "imagefolder":
        return load_imagefolder(root, data_args, report=report)
    raise ValueError(f"--dataset_layout {layout!r}: unknown; use auto, imagefolder, flickr8k or karpathy.")


def detect_layout(root: Path) -> tuple[str, tuple[Path, dict] | None]:
    """Detect the layout of a dataset folder: Karpathy file, then Flickr8k, then image folder."""
    karpathy = find_karpathy_file(root, required=False)
    if karpathy is not None:
        return "karpathy", karpathy
    if _is_flickr8k(root):
        return "flickr8k", None
    if _imagefolder_metadata(root):
        return "imagefolder", None
    raise ValueError(
        f"--dataset_dir {root}: could not detect the dataset layout. Looked for: a Karpathy split file "
        "dataset_*.json with an 'images' key; captions.txt next to an Images/ folder (Flickr8k); metadata.jsonl or "
        "metadata.csv at the top or in train/, validation/ (val/, valid/, dev/), test/ sub-folders (image folder). "
        "Fix --dataset_dir or set --dataset_layout to karpathy, flickr8k or imagefolder."
    )


def find_karpathy_file(root: Path, *, required: bool) -> tuple[Path, dict] | None:
    """The Karpathy split file (path, parsed JSON): ``root`` itself or the one ``dataset_*.json`` in it."""
    candidates = [root] if root.is_file() else sorted(root.glob("dataset_*.json"))
    found = []
    for path in candidates:
        document = _read_json(path)
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--dataset_dir: {path} is not valid JSON ({error}).") from error


def load_karpathy(
    path: Path, document: dict, data_args: DataArguments, *, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Karpathy split file: its "split" field gives the splits (restval joins train, val is validation)."""
    image_root = Path(data_args.image_dir) if data_args.image_dir else (path.parent if path.is_file() else path)
    where = f"--dataset_dir {data_args.dataset_dir} ({path.name})"
    hint = (
        f"Image paths are {image_root}/<filepath>/<filename>; set --image_dir to the folder that holds them "
        "(default: --dataset_dir)."
    )
    tables = {}
    for split in SPLITS:
        split_where = f"{where}, {split} split"
        tables[split] = ImageTable(split_where, hint, _caption_stats(split_where, data_args, report, register=False))
    unknown = 0
    for number, entry in enumerate(document["images"]):
        split = KARPATHY_SPLITS.get(str(entry.get("split")))
        if split is None:
            unknown += 1
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"{where}, images[{number}]: no 'filename'; is this a Karpathy split file?")
        relative = Path(entry.get("filepath") or "") / filename
        sentences = entry.get("sentences") or []
        raws = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        table = tables[split]
        table.stats.rows += 1
        entry_where = f"{table.where}, images[{number}] ({relative.as_posix()})"
        captions = clean_captions(raws, entry_where, table.stats)
        table.add(os.path.abspath(image_root / relative), relative.as_posix(), captions, entry_where)
    if unknown:
        logger.warning("%s: skipped %d image(s) whose split is not train, restval, val or test.", where, unknown)
    used = {split: table for split, table in tables.items() if table.paths}
    if report is not None:
        report.sources.update({table.where: table.stats for table in used.values()})
    return {split: table.to_dataset() for split, table in used.items()}


def _is_flickr8k(root: Path) -> bool:
    return (root / "captions.txt").is_file() and (root / "Images").is_dir()


def load_flickr8k(
    root: Path, data_args: DataArguments, *, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Flickr8k (Kaggle layout): ``captions.txt`` ("image,caption", unquoted captions) and ``Images/``; one split.

    A line holding bytes that are not UTF-8 is skipped and counted.
    """
    captions_file = root / "captions.txt"
    if not _is_flickr8k(root):
        raise ValueError(
            f"--dataset_dir {root}: the flickr8k layout needs captions.txt and an Images/ folder; "
            "fix --dataset_dir or set another --dataset_layout."
        )
    where = f"--dataset_dir {root} (captions.txt)"
    stats = _caption_stats(where, data_args, report)
    table = ImageTable(where, f"Expected the images in {root / 'Images'}; fix --dataset_dir.", stats)
    with open_text(captions_file) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or (number == 1 and line.replace(" ", "").lower() == "image,caption"):
                continue
            stats.rows += 1
            raw = undecodable(line)
            if raw is not None:
                stats.note("non_utf8", f"line {number}", _raw(raw))
                continue
            name, comma, caption = line.partition(",")  # captions hold commas and are not quoted
            if not comma or not name.strip():
                raise ValueError(f"{where}, line {number}: expected 'image,caption', got {line[:80]!r}.")
            image_id = f"Images/{name.strip()}"
            line_where = f"{where}, line {number}"
            captions = clean_captions([caption], line_where, stats)
            table.add(os.path.abspath(root / image_id), image_id, captions, line_where)
    return {"train": table.to_dataset()}


def _imagefolder_metadata(root: Path) -> dict[str, Path]:
    """Metadata file per split: the top-level one (as train), else those of the split sub-folders."""
    top = _metadata_file(root)
    if top is not None:
        return {"train": top}
    found: dict[str, Path] = {}
    for folder in IMAGEFOLDER_SPLIT_DIRS:
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


def load_imagefolder(
    root: Path, data_args: DataArguments, *, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Image folder: ``metadata.jsonl``/``metadata.csv`` (file_name + captions) at the top or per split sub-folder."""
    metadata = _imagefolder_metadata(root)
    if not metadata:
        raise ValueError(
            f"--dataset_dir {root}: no metadata.jsonl or metadata.csv at the top or in train/, validation/ "
            "(val/, valid/, dev/), test/; fix --dataset_dir or set another --dataset_layout."
        )
    splits = {}
    for split, path in metadata.items():
        where = f"--dataset_dir {root} ({path.relative_to(root).as_posix()})"
        hint = f"file_name paths are relative to {path.parent}; fix them or --dataset_dir."
        splits[split] = load_table_file(path, data_args, where, hint, report=report)
    return splits


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def split_by_image(splits: dict[str, datasets.Dataset], data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """Carve the missing test, then validation split out of train, by image (never by caption row)."""
    percentages = {"test": data_args.test_split_percentage, "validation": data_args.validation_split_percentage}
    for split, percent in percentages.items():
        if not 0 <= percent < 100:
            raise ValueError(f"--{_percent_flag(split)} {percent}: must be at least 0 and below 100.")
    wanted = {split: pct for split, pct in percentages.items() if split not in splits and pct > 0}
    if "train" not in splits or not wanted:
        return splits
    train = splits["train"]
    n = len(train)
    sizes = {split: _carve_size(n, pct) for split, pct in wanted.items()}
    flags = " and ".join(f"--{_percent_flag(split)} {pct:g}" for split, pct in wanted.items())
    if any(size == 0 for size in sizes.values()) or sum(sizes.values()) >= n:
        raise ValueError(
            f"The training split has {n} images, too few to hold out {flags} by image "
            f"({', '.join(f'{split}: {size}' for split, size in sizes.items())} images). Lower the percentages, "
            "set them to 0, or give validation/test data."
        )
    order = np.random.default_rng(data_args.split_seed).permutation(n)
    carved, start = {}, 0
    for split in ("test", "validation"):
        if split in sizes:
            carved[split] = np.sort(order[start : start + sizes[split]])
            start += sizes[split]
    result = dict(splits)
    result["train"] = train.select(np.sort(order[start:]).tolist())
    for split, indices in carved.items():
        result[split] = train.select(indices.tolist())
        logger.info("Held out %d of %d training images as the %s split.", len(indices), n, split)
    return result


def _carve_size(n: int, percent: float) -> int:
    size = int(round(n * percent / 100))
    return max(size, 1) if percent > 0 and n >= 3 else size


def _percent_flag(split: str) -> str:
    return f"{split}_split_percentage"


def limit_samples(splits: dict[str, datasets.Dataset], data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """Apply ``--max_train_samples``/``--max_eval_samples``/``--max_predict_samples``: the first N images."""
    limits = {
        "train": ("max_train_samples", data_args.max_train_samples),
        "validation": ("max_eval_samples", data_args.max_eval_samples),
        "test": ("max_predict_samples", data_args.max_predict_samples),
    }
    result = dict(splits)
    for split, (flag, limit) in limits.items():
        if limit is None:
            continue
        if limit < 1:
            raise ValueError(f"--{flag} {limit}: must be a positive number of images (or unset for all).")
        if split in result and limit < len(result[split]):
            result[split] = result[split].select(range(limit))
    return result
