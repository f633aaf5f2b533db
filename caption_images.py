#!/usr/bin/env python
"""Caption image files with a fine-tuned captioner (a run's output_dir: LoRA adapter or full model, or a merged
model), using the run's prompt and generation settings; write captions.jsonl or captions.csv.

    python caption_images.py --model outputs/blip-flickr8k --images photos/ more/*.jpg --output captions.jsonl
    python caption_images.py --help

Captions are written as they come, to ``<output>.partial``, which becomes ``<output>`` at the end: an interrupted
run keeps what it captioned, and ``--resume`` continues it (same flags: the images already in the .partial file
are skipped, the others appended; the result is the file an uninterrupted run writes).

File names that are not UTF-8 (possible on Linux) are captioned like any other; the output stays valid UTF-8: in
jsonl, their undecodable bytes are JSON escapes ``\\udc80``-``\\udcff`` (Python's ``json.loads`` gives back
the name ``open`` and ``os.fsencode`` take: the exact bytes), in csv and ``<output>.skipped.txt`` they read
``\\xe9``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from captioning.arguments import GENERATION_FLAGS
from captioning.inference import (
    FileCaptions,
    add_model_arguments,
    caption_files,
    load_captioner,
    printable_path,
    setup_cli_logging,
)
from captioning.outputs import write_text_atomic

logger = logging.getLogger("caption_images")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OUTPUT_FORMATS = (".jsonl", ".csv")
GLOB_CHARACTERS = "*?["
SKIPPED_SHOWN = 10  # skipped files named in the summary line (all of them are in <output>.skipped.txt)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # how Python holds the bytes of a file name that are not UTF-8


def main(argv: list[str] | None = None) -> FileCaptions:
    """Caption the images the flags name and write the output file; returns the captions (those of an earlier,
    resumed run first) and the skipped files."""
    args = parse_args(argv)
    setup_cli_logging("caption_images")
    output_format = check_output(args.output, overwrite=args.overwrite, resume=args.resume)
    paths = collect_images(args.images, recursive=args.recursive)
    logger.info("Found %d images", len(paths))
    earlier = read_partial(partial_path(args.output), output_format) if args.resume else None
    if earlier is not None:
        done = {image for image, _ in earlier}
        paths = [path for path in paths if output_name(path, output_format) not in done]
        logger.info("Resuming: %d images captioned earlier, %d to go", len(earlier), len(paths))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer was used
    captioner = load_captioner(
        args.model, base_model=args.base_model, device=args.device, dtype=args.dtype, caption_prompt=args.caption_prompt
    )
    overrides = {name: getattr(args, name) for name in GENERATION_FLAGS}
    logger.info("Prompt %r, generation %s", captioner.caption_prompt, captioner.generation_settings(**overrides))
    with logging_redirect_tqdm(), CaptionsWriter(args.output, output_format, append=earlier is not None) as writer:
        result = caption_files(
            captioner,
            paths,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            on_captions=writer.write,
            **overrides,
        )
        writer.finish()
    if earlier:
        result.captions[:0] = earlier
    skipped_file = write_skipped(args.output, result.skipped)
    log_summary(result, args.output, skipped_file, resumed=len(earlier or ()))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        help=f"Folders (files ending in {' '.join(IMAGE_EXTENSIONS)}), glob patterns (quote them) or image files.",
    )
    parser.add_argument("--recursive", action="store_true", help="Descend into subfolders; lets ** in globs recurse.")
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="captions.jsonl ({image, caption} lines) or captions.csv; written as <output>.partial until the end.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output (and its .partial).")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted run from <output>.partial: its images are skipped, the others appended.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per generate call (default: 16).")
    parser.add_argument(
        "--num_workers", type=int, default=2, help="Processes that decode images (default: 2; 0: in this process)."
    )
    parser.add_argument(
        "--caption_prompt",
        help="Text generation starts from and that is cut from captions (default: the run's; '' for none).",
    )
    generation = parser.add_argument_group("generation (default: the run's captioning_config.json, else family's)")
    generation.add_argument("--num_beams", type=int, help="Beams (1: greedy).")
    generation.add_argument("--max_new_tokens", type=int, help="Longest caption in tokens.")
    generation.add_argument(
        "--min_new_tokens", type=int, help="Shortest caption in tokens (lowered to --max_new_tokens if above it)."
    )
    generation.add_argument("--repetition_penalty", type=float, help="Repetition penalty (LAVIS: 1.15).")
    generation.add_argument("--no_repeat_ngram_size", type=int, help="Forbid repeating n-grams of this size.")
    generation.add_argument("--length_penalty", type=float, help="Beam-search length penalty.")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, minimum in (("batch_size", 1), ("num_workers", 0), ("num_beams", 1), ("max_new_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} {value}: must be at least {minimum}.")
    if (
        args.min_new_tokens is not None
        and args.max_new_tokens is not None
        and args.min_new_tokens > args.max_new_tokens
    ):
        raise ValueError(f"--min_new_tokens {args.min_new_tokens} exceeds --max_new_tokens {args.max_new_tokens}.")
    return args


def check_output(output: Path, *, overwrite: bool = False, resume: bool = False) -> str:
    """The output format, from the extension; an earlier run's output or .partial file is never replaced unless
    asked (--overwrite, --resume)."""
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(
            f"--output {output}: unknown extension {suffix or '(none)'!r}; use {' or '.join(OUTPUT_FORMATS)} "
            "(e.g. --output captions.jsonl)."
        )
    if output.exists() and not overwrite:
        raise ValueError(
            f"--output {output} already exists: pass --overwrite to replace it, or choose another --output."
        )
    partial = partial_path(output)
    if partial.exists() and not (overwrite or resume):
        raise ValueError(
            f"--output {output}: {partial} holds the captions of an interrupted run: pass --resume to continue it, "
            "or --overwrite to start over."
        )
    return suffix


def collect_images(entries: Sequence[str], *, recursive: bool = False) -> list[str]:
    """Image paths named by folders, glob patterns and files, without duplicates, sorted.

    Folders and globs yield files with an image extension (hidden files left out); a file named explicitly is
    always taken, so an unreadable or missing one is reported later rather than dropped in silence.
    """
    found: dict[str, str] = {}
    for entry in entries:
        matches = list(expand_entry(entry, recursive))
        if not matches:
            logger.warning("--images %s: no image files there", entry)
        for path in matches:
            found.setdefault(os.path.realpath(path), os.path.normpath(path))
    if not found:
        raise ValueError(
            f"--images {' '.join(entries)}: found no images. Folders and globs match {' '.join(IMAGE_EXTENSIONS)}"
            + ("" if recursive else "; --recursive also searches subfolders")
            + "."
        )
    return sorted(found.values())


def expand_entry(entry: str, recursive: bool) -> Iterable[str]:
    path = Path(entry)
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.iterdir()
        return (str(file) for file in candidates if _is_image_file(file, path))
    if any(character in entry for character in GLOB_CHARACTERS):
        return (match for match in glob.glob(entry, recursive=recursive) if _is_image_file(Path(match)))
    return [entry]


def _is_image_file(path: Path, root: Path | None = None) -> bool:
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    hidden = any(part.startswith(".") for part in parts)
    return not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def output_name(path: str, output_format: str) -> str:
    """How a file name reads in the output: itself, except for bytes that are not UTF-8 (a name ``os.listdir``
    gives with surrogate escapes): csv writes them ``\\xe9``; jsonl keeps them, as JSON escapes (``_json_line``)."""
    if output_format == ".jsonl":
        return path
    return printable_path(path)


def _json_line(record: dict) -> str:
    """One jsonl line, valid UTF-8: lone surrogates (undecodable bytes of a file name) become ``\\udcXX``."""
    text = json.dumps(record, ensure_ascii=False)
    return LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text) + "\n"


def format_captions(captions: list[tuple[str, str]], output_format: str) -> str:
    """jsonl: one ``{"image": path, "caption": text}`` per line; csv: ``image,caption`` rows (header apart)."""
    if output_format == ".jsonl":
        return "".join(_json_line({"image": image, "caption": caption}) for image, caption in captions)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        (output_name(image, output_format), caption) for image, caption in captions
    )
    return buffer.getvalue()


class CaptionsWriter:
    """Writes captions to ``<output>.partial`` as they come (flushed to disk batch by batch); ``finish`` renames it
    to ``<output>``. Left unfinished (an error, Ctrl-C, a killed process), the .partial file stays for --resume."""

    def __init__(self, output: Path, output_format: str, *, append: bool = False):
        self.output, self.output_format = output, output_format
        self.path = partial_path(output)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a" if append else "w", encoding="utf-8", newline="")  # noqa: SIM115
        if output_format == ".csv" and self.handle.tell() == 0:
            self.handle.write("image,caption\n")
            self._sync()

    def write(self, captions: list[tuple[str, str]]) -> None:
        self.handle.write(format_captions(captions, self.output_format))
        self._sync()

    def finish(self) -> None:
        self.handle.close()
        os.replace(self.path, self.output)

    def _sync(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def __enter__(self) -> CaptionsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


def read_partial(path: Path, output_format: str) -> list[tuple[str, str]] | None:
    """The ``(image, caption)`` records of an interrupted run's .partial file (None when there is none). A record
    cut short by the interruption is removed from the file, which is then ready to be appended to."""
    if not path.exists():
        logger.info("--resume: no %s, starting from the first image", path)
        return None
    data = path.read_bytes()
    text = data[: data.rfind(b"\n") + 1].decode("utf-8")  # whole lines only
    records, kept = _parse_jsonl(text) if output_format == ".jsonl" else _parse_csv(text)
    if kept < len(text) or len(text) < len(data):
        logger.warning("--resume: dropped the incomplete end of %s (cut by the interruption)", path)
        with open(path, "r+b") as handle:
            handle.truncate(len(text[:kept].encode("utf-8")))
    return records


def _parse_jsonl(text: str) -> tuple[list[tuple[str, str]], int]:
    """Records up to the first line that is not one; and the length of text they take."""
    records, kept = [], 0
    for line in text.split("\n")[:-1]:  # not splitlines: captions may hold U+2028 & co., which JSON keeps as is
        line += "\n"
        try:
            row = json.loads(line)
            records.append((row["image"], row["caption"]))
        except (ValueError, KeyError, TypeError):
            break
        kept += len(line)
    return records, kept


def _parse_csv(text: str) -> tuple[list[tuple[str, str]], int]:
    """Rows after the header, up to the first that is not ``image,caption``; and the length of text they take (a
    row may span lines: captions with line breaks are quoted)."""
    lines = text.split("\n")[:-1]  # each ended by \n
    consumed = [0]

    def feed():
        for line in lines:
            consumed[0] += len(line) + 1
            yield line + "\n"

    reader = csv.reader(feed(), strict=True)
    records, kept = [], 0
    try:
        if next(reader, None) != ["image", "caption"]:
            return [], 0
        kept = consumed[0]
        for row in reader:
            if len(row) != 2:
                break
            records.append((row[0], row[1]))
            kept = consumed[0]
    except csv.Error:  # a quoted caption cut short
        pass
    return records, kept


def skipped_path(output: Path) -> Path:
    return output.with_name(output.name + ".skipped.txt")


def write_skipped(output: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """``<output>.skipped.txt``: one ``path<TAB>reason`` line per unreadable image; an older one is removed."""
    path = skipped_path(output)
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    lines = (f"{output_name(image, '.csv')}\t{' '.join(reason.split())}\n" for image, reason in skipped)
    write_text_atomic(path, "".join(lines))
    return path


def log_summary(result: FileCaptions, output: Path, skipped_file: Path | None, *, resumed: int = 0) -> None:
    if not result.captions:
        logger.warning("No image could be read; %s is empty.", output)
    if resumed:
        logger.info("%d of the captions come from the interrupted run that --resume continued", resumed)
    if skipped_file is None:
        logger.info("Captioned %d images, skipped 0; wrote %s", len(result.captions), output)
        return
    shown = [printable_path(image) for image, _ in result.skipped[:SKIPPED_SHOWN]]
    more = len(result.skipped) - len(shown)
    logger.info(
        "Captioned %d images, skipped %d unreadable (listed in %s): %s%s; wrote %s",
        len(result.captions),
        len(result.skipped),
        skipped_file,
        ", ".join(shown),
        f" and {more} more" if more else "",
        output,
    )


if __name__ == "__main__":
    main()
