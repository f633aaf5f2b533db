"""Resuming and rotating: which run a checkpoint belongs to (run.json, checkpoint_complete.json), which checkpoint is
complete enough to trust, and which ones rotation may delete."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from captioning.outputs import write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
RUN_RECORD = "run.json"  # output_dir's current run: {"run_id": ...}
LATEST = ("latest", "last", "true")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MarkCompleteCheckpoints(TrainerCallback):
    """Writes ``checkpoint_complete.json`` (the step and the run id) into a checkpoint once the Trainer has saved all
    of it.

    The Trainer writes a checkpoint file by file; a run killed in the middle leaves a folder that looks like a
    checkpoint. Only folders with the marker are resumed from, and only those of the run being continued.
    """

    def __init__(self, run_id: str):
        self.run_id = run_id

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(folder / COMPLETE_MARKER, {"global_step": state.global_step, "run_id": self.run_id})
        return control


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_run_id(folder: str | Path) -> str | None:
    """The run id in a checkpoint's marker; None for an incomplete checkpoint or one saved before run ids."""
    return _read_json(Path(folder) / COMPLETE_MARKER).get("run_id")


def read_run_id(output_dir: str | Path) -> str | None:
    """The run id in ``output_dir/run.json``, or None when there is none."""
    return _read_json(Path(output_dir) / RUN_RECORD).get("run_id")


def write_run_record(output_dir: str | Path, run_id: str) -> None:
    write_json(Path(output_dir) / RUN_RECORD, {"run_id": run_id})


def checkpoint_step(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, lowest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(folders, key=checkpoint_step)


def latest_complete_checkpoint(output_dir: str | Path, run_id: str) -> Path | None:
    """The highest-step checkpoint of run ``run_id`` in ``output_dir`` that was saved completely; incomplete ones and
    other runs' are logged and skipped."""
    for folder in reversed(checkpoint_folders(output_dir)):
        if not is_complete(folder):
            logger.warning("Ignoring %s: it was not saved completely (no %s).", folder, COMPLETE_MARKER)
        elif checkpoint_run_id(folder) != run_id:
            logger.warning("Ignoring %s: it belongs to another run than %s (%s).", folder, run_id, RUN_RECORD)
        else:
            return folder
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``latest`` for the newest complete checkpoint of the run
    recorded in ``output_dir/run.json`` (never one another run left there)."""
    if value is None or value == "":
        return None
    if value.lower() in LATEST:
        run_id = read_run_id(output_dir)
        if run_id is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: --output_dir {output_dir} has no {RUN_RECORD}, so which run to "
                "continue is unknown (no run started there, or an older version wrote it). Give the checkpoint "
                "folder instead: --resume_from_checkpoint <output_dir>/checkpoint-N."
            )
        found = latest_complete_checkpoint(output_dir, run_id)
        if found is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint of run {run_id} in --output_dir "
                f"{output_dir}. Start a fresh run, or give a checkpoint folder."
            )
        logger.info("Resuming from %s (run %s)", found, run_id)
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


def rotate_run_checkpoints(
    output_dir: str | Path, run_id: str, limit: int | None, newest: Path, best: str | None = None
) -> list[Path]:
    """Delete the oldest checkpoints of run ``run_id`` until ``limit`` remain, as the Trainer's rotation does but
    never another run's checkpoint nor an incomplete one of unknown run. ``newest`` (the checkpoint being saved,
    not yet marked) and ``best`` are always kept. Returns the deleted folders."""
    if limit is None or limit <= 0:
        return []
    newest = Path(newest)
    ours = [
        folder
        for folder in checkpoint_folders(output_dir)
        if folder.name == newest.name or (is_complete(folder) and checkpoint_run_id(folder) == run_id)
    ]
    kept = {newest.name, Path(best).name if best else newest.name}
    keep_at_least = max(limit, len(kept & {path.name for path in ours}))
    deleted = []
    for folder in ours:
        if len(ours) - len(deleted) <= keep_at_least:
            break
        if folder.name not in kept:
            logger.info("Deleting older checkpoint %s (--save_total_limit %d)", folder, limit)
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    return deleted
