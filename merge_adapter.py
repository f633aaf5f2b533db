#!/usr/bin/env python
"""Merge a LoRA adapter (a training run's output_dir) into its base model and save a standalone model that loads
with the plain transformers class (no peft), with the processor and the run's captioning_config.json.

    python merge_adapter.py outputs/blip-flickr8k --output_dir outputs/blip-flickr8k-merged
    python merge_adapter.py --help
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from captioning.inference import DTYPES, merge_adapter, setup_cli_logging

logger = logging.getLogger("merge_adapter")


def main(argv: list[str] | None = None) -> Path:
    """Merge the adapter the flags name; returns the output folder."""
    args = build_parser().parse_args(argv)
    setup_cli_logging("merge_adapter")
    return merge_adapter(
        args.adapter_dir,
        args.output_dir,
        base_model=args.base_model,
        dtype=args.dtype,
        overwrite_output_dir=args.overwrite_output_dir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="Folder with adapter_config.json + adapter_model.safetensors (a run).")
    parser.add_argument("--output_dir", required=True, help="Where the merged model goes (a new or empty folder).")
    parser.add_argument(
        "--base_model",
        help="Base checkpoint (folder or Hub id); default: base_model_name_or_path of adapter_config.json. For an "
        "adapter trained with --load_in_8bit/--load_in_4bit give the full-precision checkpoint: merging into "
        "8-bit/4-bit weights is not supported, the base is always loaded unquantized.",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype the base is loaded, merged and saved in (default: auto, the checkpoint's own). float32 merges most "
        "exactly; bfloat16 halves the size.",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace the model in a non-empty --output_dir."
    )
    return parser


if __name__ == "__main__":
    main()
