#!/usr/bin/env python
"""Push a finished run's output_dir to the Hugging Face Hub again, without retraining: the same allow-listed files,
token rules and retries as ``run_captioning.py --push_to_hub``. The token comes from HF_TOKEN or `hf auth login`.

    python push_to_hub.py outputs/blip-flickr8k --hub_model_id your-name/blip-flickr8k-lora --hub_private_repo
"""

from __future__ import annotations

import argparse
import logging
import sys

from captioning.hub import DEFAULT_COMMIT_MESSAGE, check_push_config, files_to_push, push_output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="The output_dir of a finished run_captioning.py run.")
    parser.add_argument(
        "--hub_model_id", required=True, help="Hub repository to create or update, e.g. your-name/blip-captions-lora."
    )
    parser.add_argument(
        "--hub_private_repo",
        action="store_true",
        help="Create the repository private (an existing public repository is refused). Default: the account's "
        "default visibility.",
    )
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE, help="Summary of the Hub commit.")
    # Accepted only to be refused with an explanation (argparse would echo the token in its own error message).
    parser.add_argument("--hub_token", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("captioning").setLevel(logging.INFO)
    try:
        files_to_push(args.output_dir)
        check_push_config(True, args.hub_model_id, args.hub_token)
        url = push_output_dir(
            args.output_dir,
            args.hub_model_id,
            private=True if args.hub_private_repo else None,
            commit_message=args.commit_message,
        )
    except (ValueError, RuntimeError) as error:
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        return 1
    print(url or f"{args.hub_model_id} already holds these files: nothing to push.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
