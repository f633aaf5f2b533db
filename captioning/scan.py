"""Bad inputs, before training: every image is decoded once (in parallel), the unusable ones leave their split, and
everything skipped or dropped (images here, captions in ``captioning.sources``) is counted by reason in a report that
goes to the log and to ``output_dir/data_report.json``, so that a bad file never stops a run at hour 9.

The catalogue (input -> outcome; the reason is the key counted in the report):

    Images (checked by ``scan_splits``; a skipped image leaves its split with all of its captions)
    ----------------------------------------------------------------------------------------------------------
    CMYK JPEG                                  accepted, converted to RGB
    RGBA / LA / P-with-transparency PNG        accepted, composited over white, RGB
    16-bit PNG (I;16)                          accepted, rescaled (not clipped) to 8-bit RGB
    EXIF-rotated JPEG (orientation 2-8)        accepted, turned upright (width and height swap for 5-8)
    1x1 pixel image (any side >= min side)     accepted: the BLIP image processor resizes PIL images of any size,
                                               1x1 and 1xN included (its channel guess only fails on numpy input,
                                               which the collator never passes); --min_image_side raises the bar
    side < --min_image_side (default 1)        skipped: too_small
    file does not exist / no bytes, no path    skipped: missing
    zero-byte file or empty bytes              skipped: empty_file
    not an image (text named .jpg, header cut) skipped: not_an_image
    truncated image (decode runs out of data)  skipped: truncated
    other decoder error (bad EXIF, bad data)   skipped: corrupt
    directory, permission denied               skipped: unreadable
    more pixels than PIL.Image.MAX_IMAGE_PIXELS skipped: too_large, from the header, before decoding. PIL only
                                               warns between 1x and 2x the limit and raises above 2x; we skip
                                               from 1x: such an image costs hundreds of MB and seconds per
                                               decode in every epoch, for a 384x384 input. Raise the limit
                                               (``PIL.Image.MAX_IMAGE_PIXELS``, None = none) to keep them.

    Captions (cleaned while loading, ``captioning.sources``; counted per source file)
    ----------------------------------------------------------------------------------------------------------
    "" (empty)                                 dropped: empty
    whitespace only                            dropped: whitespace_only
    None: JSON null, empty csv field, absent   dropped: null
    NaN: JSON NaN literal, or a cell reading   dropped: nan
    nan / NaN / None / null / <NA>
    1,000 words                                kept; counted as long (more words than --max_caption_length, so
                                               the collator surely keeps only its first max_caption_length tokens)
    same (image, caption) twice                collapsed into one reference: duplicate
    row with bytes that are not UTF-8          row skipped (all its captions): non_utf8, with its row/line
    (csv, jsonl, Flickr8k captions.txt)        number; a file in another encoding is better re-encoded than
                                               decoded with replacement characters the tokenizer turns into [UNK]
    Flickr30k row without its separators       row skipped: malformed_row (a row missing only the second
                                               separator keeps its caption, logged)
    COCO caption of an image id not in images  caption skipped: unknown_image
    image left without any caption             image dropped: no_caption
    caption that is a number, dict, ...        fatal ValueError (the wrong --caption_column)

    Structure (fatal, before training)
    ----------------------------------------------------------------------------------------------------------
    no image column / no caption column        ValueError naming the file, the columns found and --image_column /
                                               --caption_column
    csv header not UTF-8, malformed csv        ValueError naming the file
    a split over --max_bad_fraction            ValueError naming the split, the fraction, --max_bad_fraction and
                                               the first bad files with their reasons (data_report.json written
                                               first); a split left with no usable image always stops the run

``CaptionPairs``/``CaptionImages`` stay strict: they raise on an unreadable image (naming it). The scan guarantees
they never meet one; with ``scan_images=False`` (``--scan_images false``) a bad image stops training when a
DataLoader worker reaches it.
"""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
from accelerate import PartialState
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .distributed import run_on_main
from .images import describe, load_image
from .outputs import write_json
from .workers import process_pool

logger = logging.getLogger(__name__)

REPORT_FILE = "data_report.json"
DEFAULT_MAX_EXAMPLES = 10
DEFAULT_CHUNK_SIZE = 256
ERROR_EXAMPLES = 5  # bad files named in the error message that stops a run

IMAGE_REASONS = (
    "missing",
    "empty_file",
    "unreadable",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_large",
    "too_small",
)
CAPTION_DROP_REASONS = ("empty", "whitespace_only", "null", "nan")
MALFORMED_ROW = "malformed_row"  # a row of a layout's file that cannot be read (e.g. Flickr30k's separators)
UNKNOWN_IMAGE = "unknown_image"  # a caption of an image the file does not list (COCO)
ROW_SKIP_REASONS = ("non_utf8", MALFORMED_ROW, UNKNOWN_IMAGE)
DUPLICATE = "duplicate"
NO_CAPTION = "no_caption"
LONG = "long"
NAN_TEXTS = frozenset({"nan", "none", "null", "<na>"})  # how pandas & co. write a missing value, lowercased


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CaptionStats:
    """What caption cleaning did to one source (a file, a Hub split): counts by reason and a few examples.

    ``long_caption_words``: captions with more words than this are counted as long (they are kept).
    """

    source: str
    long_caption_words: int | None = None
    max_examples: int = DEFAULT_MAX_EXAMPLES
    rows: int = 0
    images: int = 0
    captions: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def note(self, reason: str, where: str, value: Any = None) -> None:
        """Count one dropped/skipped/collapsed/long item; keep it as an example while its reason has few."""
        self.counts[reason] += 1
        if self.counts[reason] <= self.max_examples:
            example = {"reason": reason, "where": where.removeprefix(f"{self.source}, ")}
            if value is not None:
                example["value"] = _shorten(value)
            self.examples.append(example)

    def is_long(self, caption: str) -> bool:
        return self.long_caption_words is not None and len(caption.split()) > self.long_caption_words

    @property
    def dropped(self) -> bool:
        return any(self.counts[reason] for reason in (*CAPTION_DROP_REASONS, *ROW_SKIP_REASONS, DUPLICATE))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "images": self.images,
            "captions": self.captions,
            "captions_dropped": _counts(self.counts, CAPTION_DROP_REASONS),
            "rows_skipped": _counts(self.counts, ROW_SKIP_REASONS),
            "duplicate_captions_collapsed": self.counts[DUPLICATE],
            "images_without_captions": self.counts[NO_CAPTION],
            "long_captions": self.counts[LONG],
            "long_caption_words": self.long_caption_words,
            "examples": self.examples,
        }

    def log(self) -> None:
        """Warn about what was dropped (with examples); captions kept but long are an info line."""
        parts = []
        dropped = _counts(self.counts, CAPTION_DROP_REASONS)
        if dropped:
            parts.append(f"dropped {sum(dropped.values())} caption(s) ({_format_counts(dropped)})")
        if self.counts["non_utf8"]:
            parts.append(
                f"skipped {self.counts['non_utf8']} row(s) that are not UTF-8 (re-encode the file as UTF-8, e.g. "
                "iconv -f cp1252 -t utf-8)"
            )
        if self.counts[DUPLICATE]:
            parts.append(f"collapsed {self.counts[DUPLICATE]} duplicate (image, caption) row(s)")
        if parts:
            shown = [e for e in self.examples if e["reason"] not in (LONG, NO_CAPTION)][:ERROR_EXAMPLES]
            logger.warning("%s: %s; e.g. %s", self.source, "; ".join(parts), _format_examples(shown))
        if self.counts[LONG]:
            logger.info(
                "%s: %d caption(s) have more than %d words; the collator keeps their first --max_caption_length "
                "tokens.",
                self.source,
                self.counts[LONG],
                self.long_caption_words,
            )


@dataclass
class SplitReport:
    """What the image scan did to one split."""

    images_total: int = 0
    images_kept: int = 0
    captions: int = 0
    scanned: bool = False
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.images_skipped / self.images_total if self.images_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_total": self.images_total,
            "images_kept": self.images_kept,
            "images_skipped": _counts(self.skipped, IMAGE_REASONS),
            "bad_fraction": round(self.bad_fraction, 6),
            "captions": self.captions,
            "scanned": self.scanned,
            "examples": self.examples,
        }


@dataclass
class DataReport:
    """Everything skipped or dropped before training: caption cleaning per source, the image scan per split."""

    sources: dict[str, CaptionStats] = field(default_factory=dict)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    max_examples: int = DEFAULT_MAX_EXAMPLES

    def add_source(self, source: str, *, long_caption_words: int | None = None) -> CaptionStats:
        """Register the caption statistics of one source and return them, to be filled while it is cleaned."""
        stats = CaptionStats(source, long_caption_words=long_caption_words, max_examples=self.max_examples)
        self.sources[source] = stats
        return stats

    def split(self, name: str) -> SplitReport:
        return self.splits.setdefault(name, SplitReport())

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "sources": {name: stats.to_dict() for name, stats in self.sources.items()},
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
        }


def write_data_report(report: DataReport, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/data_report.json`` atomically; returns its path."""
    path = Path(output_dir) / REPORT_FILE
    write_json(path, report.to_dict())
    return path


def _counts(counter: Counter, reasons: Iterable[str]) -> dict[str, int]:
    return {reason: counter[reason] for reason in reasons if counter[reason]}


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items())


def _format_examples(examples: list[dict[str, Any]]) -> str:
    parts = []
    for example in examples:
        name = example.get("image") or example.get("where")
        detail = example.get("detail") or example.get("value")
        parts.append(f"{name} ({example['reason']}{': ' + str(detail) if detail else ''})")
    return "; ".join(parts)


def _shorten(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------------------


class ImageCheck(NamedTuple):
    """What a scan worker sends back for one image: never the image itself."""

    index: int
    ok: bool
    reason: str | None
    detail: str
    width: int
    height: int


def check_image(source: Any, *, min_image_side: int = 1) -> tuple[str | None, str, int, int]:
    """Decode ``source`` fully, as training will (``load_image``); returns (reason or None, detail, width, height).

    Reasons are those of ``IMAGE_REASONS``; width and height are those of the upright RGB image (0 when unknown).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's per-file warnings would drown the progress bar
        try:
            if not isinstance(source, Image.Image):
                raw = _raw_source(source)
                if _is_empty(raw):
                    return "empty_file", "the file is empty (0 bytes)", 0, 0
                with Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw) as probe:
                    width, height = probe.size  # the header only: no pixels are decoded yet
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and width * height > limit:
                    return (
                        "too_large",
                        f"{width}x{height} px: {width * height} pixels, above PIL.Image.MAX_IMAGE_PIXELS {limit}",
                        width,
                        height,
                    )
            image = load_image(source)
            width, height = image.size
        except Exception as error:  # any failure is a verdict on this file, never the end of the scan
            return _reason(error), f"{type(error).__name__}: {error}", 0, 0
    if min(width, height) < min_image_side:
        return "too_small", f"{width}x{height} px, below --min_image_side {min_image_side}", width, height
    return None, "", width, height


def _raw_source(source: Any) -> bytes | str | os.PathLike:
    """What ``load_image`` will open: the bytes or the path (a dict's bytes win, as in ``load_image``)."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return source["path"]
        if source.get("bytes") is not None:
            return b""
        raise FileNotFoundError("the image value has neither bytes nor a path")
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    return source


def _is_empty(raw: bytes | str | os.PathLike) -> bool:
    if isinstance(raw, bytes):
        return not raw
    return os.stat(raw).st_size == 0  # FileNotFoundError -> missing


def _reason(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return "too_large"
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, UnidentifiedImageError):
        return "not_an_image"
    if "truncated" in str(error).lower():
        return "truncated"
    if isinstance(error, IsADirectoryError | NotADirectoryError | PermissionError):
        return "unreadable"
    return "corrupt"


def _check_chunk(start: int, sources: list, min_image_side: int) -> list[ImageCheck]:
    checks = []
    for offset, source in enumerate(sources):
        reason, detail, width, height = check_image(source, min_image_side=min_image_side)
        checks.append(ImageCheck(start + offset, reason is None, reason, detail, width, height))
    return checks


def _init_worker(max_image_pixels: int | None) -> None:
    """Give a worker the parent's decompression-bomb limit (a spawned worker would start from PIL's default)."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def scan_splits(
    splits: dict[str, datasets.Dataset],
    *,
    report: DataReport | None = None,
    scan_images: bool = True,
    num_workers: int | None = None,
    max_bad_fraction: float = 0.01,
    min_image_side: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    show_progress: bool = True,
    report_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, datasets.Dataset], DataReport]:
    """Decode every image of every split once and drop the unusable ones; returns (clean splits, report).

    Splits keep their order (``Dataset.select`` on the good rows; a split with no bad image is returned as is).
    ``num_workers`` processes decode chunks of ``chunk_size`` images (None: one per CPU; 0 or 1, or splits of one
    chunk: in this process).
    ``report`` (e.g. the one ``load_caption_splits`` filled) gets the per-split counts; with ``report_dir`` it is
    written there as data_report.json before any error is raised. Raises ``ValueError`` when a split has more
    than ``max_bad_fraction`` of its images unusable, or none usable. ``scan_images=False`` checks nothing.
    """
    _check_settings(max_bad_fraction, min_image_side, num_workers, chunk_size)
    report = report if report is not None else DataReport()
    workers = _resolve_workers(num_workers)
    report.settings.update(
        scan_images=scan_images,
        min_image_side=min_image_side,
        max_image_pixels=Image.MAX_IMAGE_PIXELS,
        max_bad_fraction=max_bad_fraction,
        num_workers=workers,
    )
    result = dict(splits)
    if not scan_images:
        for name, split in splits.items():
            entry = report.split(name)
            entry.images_total = entry.images_kept = len(split)
            entry.scanned = False
        logger.warning(
            "--scan_images false: images are not checked before training; an unreadable image will stop the run "
            "when a DataLoader worker reaches it."
        )
    else:
        one_chunk = max((len(split) for split in splits.values()), default=0) <= chunk_size
        with _executor(1 if one_chunk else workers) as executor:  # no pool to start for a single chunk
            for name, split in splits.items():
                result[name] = _scan_split(
                    name,
                    split,
                    report,
                    executor=executor,
                    workers=workers,
                    min_image_side=min_image_side,
                    chunk_size=chunk_size,
                    show_progress=show_progress,
                )
    report_path = write_data_report(report, report_dir) if report_dir is not None else None
    check_bad_fraction(report, max_bad_fraction, report_path=report_path)
    return result, report


def check_bad_fraction(report: DataReport, max_bad_fraction: float, *, report_path: Path | None = None) -> None:
    """Raise ``ValueError`` for the splits with more than ``max_bad_fraction`` of their images unusable (or none
    usable), naming the split, the fraction, ``--max_bad_fraction`` and the first bad files."""
    problems = []
    for name, split in report.splits.items():
        if not split.scanned or not split.images_skipped:
            continue
        if split.images_kept and split.bad_fraction <= max_bad_fraction:
            continue
        verdict = (
            "none is usable"
            if not split.images_kept
            else f"above --max_bad_fraction {max_bad_fraction:g} ({max_bad_fraction:.2%})"
        )
        problems.append(
            f"- the {name} split has {split.images_skipped} unusable image(s) out of {split.images_total} "
            f"({split.bad_fraction:.2%}), {verdict}. First ones: {_format_examples(split.examples[:ERROR_EXAMPLES])}."
        )
    if problems:
        fix = "Fix or remove these files"
        if any(split.images_kept for split in report.splits.values() if split.scanned and split.images_skipped):
            fix += ", or raise --max_bad_fraction to train on the usable images only"
        where = f" All counts and examples: {report_path}." if report_path else ""
        raise ValueError("Stopping before training:\n" + "\n".join(problems) + f"\n{fix}.{where}")


def _check_settings(max_bad_fraction: float, min_image_side: int, num_workers: int | None, chunk_size: int) -> None:
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"--max_bad_fraction {max_bad_fraction}: must be between 0 and 1 (0.01 is 1 %).")
    if min_image_side < 1:
        raise ValueError(f"--min_image_side {min_image_side}: must be at least 1 pixel.")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers {num_workers}: must be 0 or more (None: one per CPU).")
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be at least 1.")


def _resolve_workers(num_workers: int | None) -> int:
    if num_workers is not None:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _InProcess:
    """Stands in for a process pool when ``num_workers`` is 0 or 1."""

    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


def _executor(workers: int) -> Executor | _InProcess:
    if workers <= 1:
        return _InProcess()
    return process_pool(workers, _init_worker, (Image.MAX_IMAGE_PIXELS,))  # one-thread workers: captioning/workers.py


def _scan_split(
    name: str,
    split: datasets.Dataset,
    report: DataReport,
    *,
    executor: Executor | None,
    workers: int,
    min_image_side: int,
    chunk_size: int,
    show_progress: bool,
) -> datasets.Dataset:
    started = time.perf_counter()
    n = len(split)
    ok = np.ones(n, dtype=bool)
    bad: list[ImageCheck] = []
    chunks = _image_chunks(split, chunk_size)
    with tqdm(total=n, desc=f"Checking {name} images", unit="img", disable=not show_progress) as bar:
        for checks in _run_chunks(chunks, executor, min_image_side, max_in_flight=2 * max(workers, 1), split=name):
            for check in checks:
                if not check.ok:
                    ok[check.index] = False
                    bad.append(check)
            bar.update(len(checks))
    clean = split if not bad else split.select(np.flatnonzero(ok).tolist())

    entry = report.split(name)
    entry.images_total = n
    entry.images_kept = len(clean)
    entry.scanned = True
    entry.skipped = Counter(check.reason for check in bad)
    entry.examples = _image_examples(split, sorted(bad), report.max_examples)
    if bad or not entry.captions:
        entry.captions = sum(len(refs) for refs in clean.select_columns(["references"])[:]["references"])
    seconds = time.perf_counter() - started
    if bad:
        logger.warning(
            "%s split: skipped %d of %d images (%s); e.g. %s",
            name,
            len(bad),
            n,
            _format_counts(_counts(entry.skipped, IMAGE_REASONS)),
            _format_examples(entry.examples[:ERROR_EXAMPLES]),
        )
    logger.info("%s split: checked %d images in %.1f s, %d usable.", name, n, seconds, len(clean))
    return clean


def _image_chunks(split: datasets.Dataset, chunk_size: int) -> Iterator[tuple[int, list]]:
    """(start, image values) chunk by chunk: paths or ``{"bytes", "path"}`` dicts, never decoded images."""
    images = split.select_columns(["image"])
    feature = images.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode:
        images = images.cast_column("image", datasets.Image(decode=False))
    for start in range(0, len(images), chunk_size):
        yield start, images[start : start + chunk_size]["image"]


def _run_chunks(
    chunks: Iterator[tuple[int, list]],
    executor: Executor | None,
    min_image_side: int,
    *,
    max_in_flight: int,
    split: str,
) -> Iterator[list[ImageCheck]]:
    """Check chunks in the pool, at most ``max_in_flight`` at a time (memory stays bounded); any completion order."""
    if executor is None:
        for start, sources in chunks:
            yield _check_chunk(start, sources, min_image_side)
        return
    pending: dict[Any, tuple[int, int]] = {}
    exhausted = False
    while True:
        while not exhausted and len(pending) < max_in_flight:
            next_chunk = next(chunks, None)
            if next_chunk is None:
                exhausted = True
                break
            start, sources = next_chunk
            pending[executor.submit(_check_chunk, start, sources, min_image_side)] = (start, len(sources))
        if not pending:
            return
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            start, size = pending.pop(future)
            try:
                yield future.result()
            except BrokenProcessPool as error:
                rows = f"image {start}" if size == 1 else f"images {start}-{start + size - 1}"
                raise RuntimeError(
                    f"An image-scan worker died (out of memory, or a crash inside an image decoder) while checking "
                    f"{rows} of the {split} split. Run the scan in one process "
                    "(--preprocessing_num_workers 0) to find the file, or skip the scan with --scan_images false."
                ) from error


def _image_examples(split: datasets.Dataset, bad: list[ImageCheck], max_examples: int) -> list[dict[str, Any]]:
    """The first ``max_examples`` bad images of each reason, in split order, named by path (and image_id)."""
    shown: Counter = Counter()
    chosen = []
    for check in bad:
        shown[check.reason] += 1
        if shown[check.reason] <= max_examples:
            chosen.append(check)
    if not chosen:
        return []
    columns = [column for column in ("image", "image_id") if column in split.column_names]
    rows = split.select_columns(columns)
    if isinstance(rows.features["image"], datasets.Image):
        rows = rows.cast_column("image", datasets.Image(decode=False))
    values = rows.select([check.index for check in chosen])[:]
    examples = []
    for i, check in enumerate(chosen):
        example = {"index": check.index, "image": describe(values["image"][i]), "reason": check.reason}
        if "image_id" in values:
            example["image_id"] = values["image_id"][i]
        example["detail"] = check.detail
        examples.append(example)
    return examples


def scan_splits_once(splits: dict[str, datasets.Dataset], **kwargs) -> tuple[dict[str, datasets.Dataset], DataReport]:
    """``scan_splits`` for a run of one or several processes: the main process scans (with its worker pool), the
    others keep the same images, so the CPUs are not oversubscribed N times. Any error of the scan stops every
    process with its message (``run_on_main``)."""
    if PartialState().num_processes == 1:
        return scan_splits(splits, **kwargs)
    scanned: dict[str, datasets.Dataset] = {}

    def scan() -> tuple[dict[str, list[int]], DataReport]:
        clean, report = scan_splits(splits, **kwargs)
        scanned.update(clean)
        return {name: _kept_rows(splits[name], clean[name]) for name in splits}, report  # row numbers travel

    kept, report = run_on_main(scan, what="Checking the images")
    if scanned:  # the main process
        return scanned, report
    return {name: split.select(kept[name]) for name, split in splits.items()}, report


def _kept_rows(original: datasets.Dataset, kept: datasets.Dataset) -> list[int]:
    """Row numbers of ``original`` that survive in ``kept`` (image_id is unique within a split)."""
    kept_ids = set(kept["image_id"])
    return [row for row, image_id in enumerate(original["image_id"]) if image_id in kept_ids]
