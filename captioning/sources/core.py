"""What every caption source shares: caption cleaning, column resolution, the per-image ``ImageTable`` of local
images, csv/jsonl/text reading (rows that are not UTF-8 are skipped and counted) and the per-image features."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from ..arguments import DataArguments
from ..scan import DUPLICATE, LONG, NAN_TEXTS, NO_CAPTION, CaptionStats, DataReport

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
TABLE_EXTENSIONS = (".csv", ".jsonl")
IMAGES_CHECKED = 20  # a wrong image root is caught from the first images alone; no stat of every file

REFERENCES_FEATURE = datasets.List(datasets.Value("string"))
LOCAL_FEATURES = datasets.Features(
    {"image": datasets.Value("string"), "references": REFERENCES_FEATURE, "image_id": datasets.Value("string")}
)

Row = tuple[str, dict[str, Any]]  # (where in the file, e.g. "row 3" or "line 7"; the row's cells)


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


def read_columns(dataset: datasets.Dataset, names: list[str]) -> dict[str, list]:
    """Read whole text columns at once, without touching (or decoding) the image column."""
    return dataset.select_columns(names)[:]


# --------------------------------------------------------------------------------------------------------------
# Statistics of one source
# --------------------------------------------------------------------------------------------------------------


def caption_stats(
    where: str, data_args: DataArguments, report: DataReport | None, *, register: bool = True
) -> CaptionStats:
    """The caption statistics of one source, registered in ``report`` when there is one (and ``register``)."""
    stats = CaptionStats(where, long_caption_words=data_args.max_caption_length)
    if report is not None:
        stats.max_examples = report.max_examples
        if register:
            report.sources[where] = stats
    return stats


def note_captionless(references: list[list[str]], names: list[str], stats: CaptionStats) -> None:
    """Count the images left without a caption (they are dropped), and their totals."""
    for refs, name in zip(references, names, strict=True):
        if not refs:
            stats.note(NO_CAPTION, name)
    stats.images = sum(1 for refs in references if refs)
    stats.captions = sum(len(refs) for refs in references)


def warn_dropped(count: int, where: str) -> None:
    if count:
        logger.warning("%s: dropped %d image(s) with no non-empty caption.", where, count)


# --------------------------------------------------------------------------------------------------------------
# Rows of a datasets.Dataset (Hub splits, parquet / webdataset shards)
# --------------------------------------------------------------------------------------------------------------


def dataset_to_images(
    dataset: datasets.Dataset, data_args: DataArguments, where: str, *, report: DataReport | None = None
) -> datasets.Dataset:
    """A dataset with an image and caption column(s) as a per-image dataset; rows sharing ``--image_id_column``
    become one image."""
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

    stats = caption_stats(where, data_args, report)
    stats.rows = len(dataset)
    text = read_columns(dataset, list(dict.fromkeys(caption_columns + ([id_column] if id_column else []))))
    keys = [str(value) for value in text[id_column]] if id_column else [str(row) for row in range(len(dataset))]
    first_rows, references, image_ids = _group_rows(keys, text, caption_columns, where, stats)

    keep = [i for i, refs in enumerate(references) if refs]
    note_captionless(references, [f"row {row}" for row in first_rows], stats)
    warn_dropped(len(references) - len(keep), where)
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


# --------------------------------------------------------------------------------------------------------------
# Local images grouped by path (csv/jsonl files and every --dataset_dir layout)
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
        note_captionless(self.references, self.image_ids, self.stats)
        warn_dropped(len(self.references) - len(keep), self.where)
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


def add_image_row(table: ImageTable, root: Path, image_id: str, cells: Iterable[Any], where: str) -> None:
    """Clean one row's captions into ``table`` under the image ``root / image_id`` (a path relative to ``root``)."""
    table.add(os.path.abspath(root / image_id), image_id, clean_captions(cells, where, table.stats), where)


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


def load_table_file(
    path: Path, data_args: DataArguments, where: str, root_hint: str, *, report: DataReport | None = None
) -> datasets.Dataset:
    """A csv/jsonl file of caption rows as a per-image dataset; image paths are relative to the file's folder."""
    stats = caption_stats(where, data_args, report)
    columns, rows = read_table(path, where, stats)
    parse_cell = parse_csv_caption if path.suffix.lower() == ".csv" else None
    table = table_from_rows(rows, columns, path.parent, data_args, where, root_hint, parse_cell, stats)
    return table.to_dataset()


# --------------------------------------------------------------------------------------------------------------
# Reading text files: csv, jsonl, plain lines
# --------------------------------------------------------------------------------------------------------------


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


def raw_text(value: str | bytes, limit: int = 100) -> str:
    """How the report shows a row that is not UTF-8: its raw bytes, shortened."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


def read_lines(path: Path, stats: CaptionStats, *, header: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end) of the non-blank lines of a text file.

    Each line is a row of ``stats``; a line holding bytes that are not UTF-8 is skipped and counted ("non_utf8").
    ``header``: a first line equal to it (compared without spaces, lowercased) is skipped and not counted.
    """
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or (number == 1 and header is not None and _is_header(line, header)):
                continue
            stats.rows += 1
            raw = undecodable(line)
            if raw is not None:
                stats.note("non_utf8", f"line {number}", raw_text(raw.rstrip()))
                continue
            yield number, line.rstrip("\r\n")


def read_csv_records(
    path: Path, where: str, stats: CaptionStats, *, header: str | None = None
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the non-empty records of a csv file, as ``read_lines`` does for lines (a record
    that is not UTF-8 is skipped and counted; a first record equal to ``header`` is skipped). Malformed csv is an
    error naming the line."""
    with open_text(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            for fields in reader:
                if not fields or (reader.line_num == 1 and header is not None and _is_header(",".join(fields), header)):
                    continue
                stats.rows += 1
                raw = undecodable(",".join(fields))
                if raw is not None:
                    stats.note("non_utf8", f"line {reader.line_num}", raw_text(raw))
                    continue
                yield reader.line_num, fields
        except csv.Error as error:
            raise ValueError(f"{where}: not valid csv after line {reader.line_num} ({error}).") from error


def _is_header(line: str, header: str) -> bool:
    return "".join(line.split()).lower() == "".join(header.split()).lower()


def _read_csv(path: Path, where: str, stats: CaptionStats) -> tuple[list[str], list[Row]]:
    rows = []
    with open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = list(reader.fieldnames or [])
            if any(undecodable(column) for column in columns):
                raise ValueError(
                    f"{where}: the header row is not UTF-8 ({raw_text(','.join(columns))}); re-encode the file as "
                    "UTF-8 (e.g. iconv -f cp1252 -t utf-8)."
                )
            for number, row in enumerate(reader, start=1):
                stats.rows += 1
                location = f"row {number} (line {reader.line_num})"
                raw = _undecodable_row(row)
                if raw is not None:
                    stats.note("non_utf8", location, raw_text(raw))
                    continue
                rows.append((location, row))
        except csv.Error as error:
            raise ValueError(f"{where}: not valid csv after line {reader.line_num} ({error}).") from error
    return columns, rows


def _undecodable_row(row: dict[str | None, Any]) -> bytes | None:
    cells = [cell for value in row.values() for cell in (value if isinstance(value, list) else [value])]
    return undecodable(",".join(cell for cell in cells if isinstance(cell, str)))


def _read_jsonl(path: Path, where: str, stats: CaptionStats) -> tuple[list[str], list[Row]]:
    rows, columns = [], {}
    for number, line in read_lines(path, stats):
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


def read_json(path: Path, where: str) -> Any:
    """A whole JSON file; an error naming the file when it is not valid JSON (or not UTF-8)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: {path} is not valid JSON ({error}).") from error


# --------------------------------------------------------------------------------------------------------------
# --dataset_dir layouts
# --------------------------------------------------------------------------------------------------------------


def first_existing(candidates: Iterable[Path], *, folder: bool = False) -> Path | None:
    """The first of ``candidates`` that is a file (a folder with ``folder=True``), or None."""
    for path in candidates:
        if path.is_dir() if folder else path.is_file():
            return path
    return None


def layout_mismatch(root: Path, name: str, detection: str) -> ValueError:
    """The error of a layout asked for by name (``--dataset_layout``) whose files are not in ``root``."""
    return ValueError(
        f"--dataset_dir {root}: not in the {name} layout, which needs {detection}. Fix --dataset_dir, or set "
        "--dataset_layout auto (or another layout)."
    )


def relative_id(path: Path, root: Path) -> str:
    """An image id: ``path`` relative to ``root``, with forward slashes."""
    return path.relative_to(root).as_posix()
