#!/usr/bin/env python
"""Caption image files with a fine-tuned captioner (a run's output_dir: LoRA adapter or full model, or a merged
model), using the run's prompt and generation settings; write captions.jsonl or captions.csv.

    python caption_images.py --model outputs/blip-flickr8k --images photos/ more/*.jpg --output captions.jsonl
    python caption_images.py --help
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from captioning.arguments import GENERATION_FLAGS
from captioning.inference import DTYPES, FileCaptions, caption_files, load_captioner, setup_cli_logging
from captioning.outputs import write_text_atomic

logger = logging.getLogger("caption_images")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OUTPUT_FORMATS = (".jsonl", ".csv")
GLOB_CHARACTERS = "*?["
SKIPPED_SHOWN = 10  # skipped files named in the summary line (all of them are in <output>.skipped.txt)


def main(argv: list[str] | None = None) -> FileCaptions:
    """Caption the images the flags name and write the output file; returns the captions and the skipped files."""
    args = parse_args(argv)
    setup_cli_logging("caption_images")
    output_format = check_output(args.output)
    paths = collect_images(args.images, recursive=args.recursive)
    logger.info("Found %d images", len(paths))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer was used
    captioner = load_captioner(
        args.model, base_model=args.base_model, device=args.device, dtype=args.dtype, caption_prompt=args.caption_prompt
    )
    overrides = {name: getattr(args, name) for name in GENERATION_FLAGS}
    logger.info("Prompt %r, generation %s", captioner.caption_prompt, captioner.generation_settings(**overrides))
    with logging_redirect_tqdm():
        result = caption_files(captioner, paths, batch_size=args.batch_size, num_workers=args.num_workers, **overrides)
    write_captions(args.output, result.captions, output_format)
    skipped_file = write_skipped(args.output, result.skipped)
    log_summary(result, args.output, skipped_file)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="A training run's output_dir (LoRA adapter or full model), a merged model folder, or a Hub model id.",
    )
    parser.add_argument(
        "--base_model",
        help="Base model of a LoRA adapter (default: base_model_name_or_path of its adapter_config.json).",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        help=f"Folders (files ending in {' '.join(IMAGE_EXTENSIONS)}), glob patterns (quote them) or image files.",
    )
    parser.add_argument("--recursive", action="store_true", help="Descend into subfolders; lets ** in globs recurse.")
    parser.add_argument(
        "--output", required=True, type=Path, help="captions.jsonl ({image, caption} lines) or captions.csv."
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per generate call (default: 16).")
    parser.add_argument(
        "--num_workers", type=int, default=2, help="Processes that decode images (default: 2; 0: in this process)."
    )
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: auto, cuda when available).")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="Weights dtype (default: auto, the checkpoint's)."
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


def check_output(output: Path) -> str:
    """The output format, from the extension."""
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(
            f"--output {output}: unknown extension {suffix or '(none)'!r}; use {' or '.join(OUTPUT_FORMATS)} "
            "(e.g. --output captions.jsonl)."
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


def write_captions(output: Path, captions: list[tuple[str, str]], output_format: str) -> None:
    """jsonl: one ``{"image": path, "caption": text}`` per line; csv: ``image,caption`` with a header row."""
    if output_format == ".jsonl":
        text = "".join(
            json.dumps({"image": image, "caption": caption}, ensure_ascii=False) + "\n" for image, caption in captions
        )
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(captions)
        text = buffer.getvalue()
    write_text_atomic(output, text)


def skipped_path(output: Path) -> Path:
    return output.with_name(output.name + ".skipped.txt")


def write_skipped(output: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """``<output>.skipped.txt``: one ``path<TAB>reason`` line per unreadable image; an older one is removed."""
    path = skipped_path(output)
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    write_text_atomic(path, "".join(f"{image}\t{' '.join(reason.split())}\n" for image, reason in skipped))
    return path


def log_summary(result: FileCaptions, output: Path, skipped_file: Path | None) -> None:
    if not result.captions:
        logger.warning("No image could be read; %s is empty.", output)
    if skipped_file is None:
        logger.info("Captioned %d images, skipped 0; wrote %s", len(result.captions), output)
        return
    shown = [image for image, _ in result.skipped[:SKIPPED_SHOWN]]
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
