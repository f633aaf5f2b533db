#!/usr/bin/env python
"""Push a finished run's output_dir to the Hugging Face Hub again, without retraining: the same allow-listed files,
rewritten without local paths, the same token rules, retries and model card (rendered again for the repo pushed to)
as ``run_captioning.py --push_to_hub``. The token comes from HF_TOKEN or `hf auth login`.

    python push_to_hub.py outputs/blip-flickr8k --hub_model_id your-name/blip-flickr8k-lora
"""

from __future__ import annotations

import argparse
import logging
import sys

from transformers.hf_argparser import string_to_bool

from captioning.arguments import unknown_flags_error
from captioning.hub import DEFAULT_COMMIT_MESSAGE, check_push_config, push_output_dir, stage_push


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="The output_dir of a finished run_captioning.py run.")
    parser.add_argument(
        "--hub_model_id", required=True, help="Hub repository to create or update, e.g. your-name/blip-captions-lora."
    )
    parser.add_argument(
        "--hub_private_repo",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=True,
        help="Create the repository private (default); --hub_private_repo false makes it public. An existing "
        "public repository is refused unless --hub_private_repo false.",
    )
    parser.add_argument(
        "--base_model_id",
        help="Hub id of the base model when the run loaded it from a local folder (required then): written in "
        "place of the local path in the pushed files.",
    )
    parser.add_argument(
        "--push_samples",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=None,
        help="Also push samples.png, predictions.jsonl and data_report.json (dataset content). Default: on when "
        "the run trained on a Hub dataset, off for local data.",
    )
    parser.add_argument(
        "--push_app",
        action="store_true",
        help="Also push a Spaces-ready app.py (a Gradio page captioning with this model through the transformers "
        "pipeline) and its requirements.txt.",
    )
    parser.add_argument(
        "--hub_overwrite_foreign_repo",
        action="store_true",
        help="Push into an existing repo that this tool did not make and that holds other files (refused without).",
    )
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE, help="Summary of the Hub commit.")
    # Accepted only to be refused with an explanation (argparse would echo the token in its own error message).
    parser.add_argument("--hub_token", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("captioning").setLevel(logging.INFO)
    try:
        if unknown:  # argparse's own error would print them, values (a token after a mistyped flag) included
            raise unknown_flags_error(unknown, parser, "python push_to_hub.py --help")
        # What would be pushed, checked before the Hub is asked anything (a local base without --base_model_id).
        stage_push(
            args.output_dir,
            args.hub_model_id,
            base_model_id=args.base_model_id,
            push_samples=args.push_samples,
            push_app=args.push_app,
        )
        check_push_config(
            True,
            args.hub_model_id,
            args.hub_token,
            private=args.hub_private_repo,
            overwrite_foreign_repo=args.hub_overwrite_foreign_repo,
        )
        url = push_output_dir(
            args.output_dir,
            args.hub_model_id,
            private=args.hub_private_repo,
            base_model_id=args.base_model_id,
            push_samples=args.push_samples,
            push_app=args.push_app,
            overwrite_foreign_repo=args.hub_overwrite_foreign_repo,
            commit_message=args.commit_message,
        )
    except (ValueError, RuntimeError) as error:
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        return 1
    print(url or f"{args.hub_model_id} already holds these files: nothing to push.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
