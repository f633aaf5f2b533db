"""Both training stages in one command (--scst_epochs): cross-entropy, then self-critical training on the same model.

Stage 1 is an ordinary cross-entropy run whose output_dir is ``<output_dir>/stage1_xe`` (its checkpoints, adapter or
model, eval_results.json and trainer_state.json: a complete run folder of its own); stage 2 continues from stage 1's
weights in memory and writes to ``output_dir`` like any run. ``--resume_from_checkpoint latest`` resumes stage 2
from its newest checkpoint, or else stage 1 from its own (stage 2 then starts afresh).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from captioning.checkpoints import LATEST, latest_complete_checkpoint, read_run_id, resolve_resume_checkpoint

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1_xe"
SCST_LEARNING_RATE_FACTOR = 0.1  # --scst_learning_rate's default, times --learning_rate


def stage1_output_dir(output_dir: str | Path) -> str:
    return str(Path(output_dir) / STAGE1_DIR)


def resolve_stage_resume(value: str | None, output_dir: str | Path) -> tuple[int, str | None]:
    """``--resume_from_checkpoint`` of a two-stage run: (the stage to resume, its checkpoint); (1, None) to start.

    ``latest``: the newest complete checkpoint of the run in ``output_dir`` (stage 2), else in stage 1's folder. A
    folder given by path belongs to stage 1 when it lies in ``<output_dir>/stage1_xe``.
    """
    if value is None or value == "":
        return 1, None
    stage1 = Path(stage1_output_dir(output_dir))
    if value.lower() in LATEST:
        run_id = read_run_id(output_dir)
        if run_id is not None and latest_complete_checkpoint(output_dir, run_id) is None:
            found = latest_complete_checkpoint(stage1, run_id)  # stage 2 saved nothing yet
            if found is not None:
                logger.info("Resuming stage 1 (cross-entropy) from %s (run %s)", found, run_id)
                return 1, str(found)
        return 2, resolve_resume_checkpoint(value, output_dir)  # the checkpoint, or the error that names none
    checkpoint = resolve_resume_checkpoint(value, output_dir)
    return (1 if Path(checkpoint).resolve().parent == stage1.resolve() else 2), checkpoint


def stage_arguments(training, caption, stage: int, resume_from: str | None):
    """The TrainingArguments of one stage: stage 1 writes to ``<output_dir>/stage1_xe`` for --num_train_epochs; stage
    2 to ``output_dir`` for --scst_epochs at --scst_learning_rate (default a tenth of --learning_rate)."""
    arguments = copy.copy(training)
    arguments.resume_from_checkpoint = resume_from
    if stage == 1:
        arguments.output_dir = stage1_output_dir(training.output_dir)
        return arguments
    arguments.num_train_epochs = caption.scst_epochs
    rate = caption.scst_learning_rate
    arguments.learning_rate = rate if rate is not None else training.learning_rate * SCST_LEARNING_RATE_FACTOR
    return arguments


def stage1_log_history(output_dir: str | Path) -> list[dict]:
    """Stage 1's log history (its trainer_state.json), or [] when it has none."""
    path = Path(stage1_output_dir(output_dir)) / "trainer_state.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("log_history", []))
    except (OSError, ValueError):
        return []


def joined_log_history(first: list[dict], second: list[dict]) -> list[dict]:
    """Stage 2's log entries after stage 1's, their steps counted on from stage 1's last (one time axis for the
    plot). An evaluation stage 2 logs at its step 0 is not a baseline: it is stage 1's final model."""
    offset = max((entry["step"] for entry in first if isinstance(entry.get("step"), int)), default=0)
    return [*first, *({**entry, "step": entry["step"] + offset} if "step" in entry else entry for entry in second)]
