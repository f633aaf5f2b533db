"""Resuming: which checkpoint is complete enough to trust, and the marker that says so."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import TrainerCallback

from captioning.outputs import write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
LATEST = ("latest", "last", "true")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MarkCompleteCheckpoints(TrainerCallback):
    """Writes ``checkpoint_complete.json`` into a checkpoint once the Trainer has saved all of it.

    The Trainer writes a checkpoint file by file; a run killed in the middle leaves a folder that looks like a
    checkpoint. Only folders with the marker are resumed from.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(folder / COMPLETE_MARKER, {"global_step": state.global_step})
        return control


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step checkpoint in ``output_dir`` that was saved completely (incomplete ones are logged)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    folders = [path for path in output_dir.iterdir() if path.is_dir() and _CHECKPOINT.match(path.name)]
    for folder in sorted(folders, key=lambda path: int(_CHECKPOINT.match(path.name).group(1)), reverse=True):
        if is_complete(folder):
            return folder
        logger.warning("Ignoring %s: it was not saved completely (no %s).", folder, COMPLETE_MARKER)
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``latest`` for the newest complete one in output_dir."""
    if value is None or value == "":
        return None
    if value.lower() in LATEST:
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint in --output_dir {output_dir}. "
                "Start a fresh run, or give a checkpoint folder."
            )
        logger.info("Resuming from %s", found)
        return str(found)
    folder = Path(value)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
    if not is_complete(folder) and not (folder / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value}: this checkpoint was not saved completely (the run stopped while "
            "writing it). Resume from an earlier one, or use --resume_from_checkpoint latest."
        )
    return str(folder)
