"""output_dir across reruns: an earlier run moved aside to previous-runs/, the run id recorded in run.json, and the
final model swapped in as a whole set."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from accelerate import PartialState

from captioning.checkpoints import checkpoint_run_id, write_run_record
from captioning.distributed import run_on_main
from captioning.outputs import write_json

logger = logging.getLogger(__name__)

PREVIOUS_RUNS = "previous-runs"  # earlier runs moved aside by --overwrite_output_dir; never pushed nor read by the card
_MOVING = ".moving-"  # a previous-runs/ folder still being filled (a crash there is finished by the next rerun)
STAGING_PREFIX = ".final-"  # output_dir/.final-<run id>/: the final model while it is written
SWAP_MANIFEST = "swap.json"  # written into the staging folder once the new set is complete: the commit point
# Top-level files that make up a model of either kind (adapter or full); the other kind's are removed by a swap.
MODEL_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
)


def new_run_id() -> str:
    return uuid.uuid4().hex


def input_paths(args) -> dict[str, str | None]:
    """The flags of ``Arguments`` that name something the run reads from disk."""
    model, data = args.model, args.data
    return {
        "--model_name_or_path": model.model_name_or_path,
        "--processor_name_or_path": model.processor_name_or_path,
        "--cache_dir": model.cache_dir,
        "--dataset_dir": data.dataset_dir,
        "--image_dir": data.image_dir,
        "--train_file": data.train_file,
        "--validation_file": data.validation_file,
        "--test_file": data.test_file,
        "--image_cache_dir": data.image_cache_dir,
    }


def start_run(training_args, inputs: dict[str, str | None] | None = None) -> str:
    """Ready ``output_dir`` for this run on the main process only (:func:`prepare_output_dir`) while the others wait,
    and return the run id, the same on every process. ``inputs`` (flag -> path, see :func:`input_paths`) are checked
    first: --overwrite_output_dir never moves what the run is about to read."""
    moves = training_args.overwrite_output_dir and not training_args.resume_from_checkpoint
    if moves and Path(training_args.output_dir).is_dir():
        check_nothing_needed_moves(training_args.output_dir, inputs or {})
    # world_size sets the processes up (TrainingArguments resets a state made before). Every process has checked
    # output_dir (check_output_dir, --resume_from_checkpoint latest) before the main one changes it.
    if training_args.world_size > 1:
        PartialState().wait_for_everyone()
    return run_on_main(
        prepare_output_dir,
        training_args.output_dir,
        resume_from=training_args.resume_from_checkpoint,
        overwrite=training_args.overwrite_output_dir,
        what="Readying --output_dir",
    )


def prepare_output_dir(output_dir: str | Path, *, resume_from: str | None, overwrite: bool) -> str:
    """Finish or discard an interrupted final save, then: resuming, keep everything and continue the run id of the
    checkpoint resumed from; with ``overwrite``, move everything of the earlier run to previous-runs/<UTC time>/;
    write the run id to run.json. Returns the run id."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    finish_final_save(output_dir)
    if resume_from:
        run_id = checkpoint_run_id(resume_from)
        if run_id is None:
            run_id = new_run_id()
            logger.warning(
                "%s records no run id (saved by an older version): continuing it as run %s.", resume_from, run_id
            )
    else:
        if overwrite:
            moved_to = move_previous_run(output_dir)
            if moved_to is not None:
                logger.info("--overwrite_output_dir: the earlier run in %s moved to %s", output_dir, moved_to)
        run_id = new_run_id()
    write_run_record(output_dir, run_id)
    logger.info("Run %s in %s", run_id, output_dir)
    return run_id


def check_nothing_needed_moves(output_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """--overwrite_output_dir moves all of output_dir: refuse when that holds the current folder or an input."""
    folder = Path(output_dir).resolve()
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        raise ValueError(
            f"--overwrite_output_dir with --output_dir {output_dir}: it holds the current folder, and everything in "
            f"it would move to {PREVIOUS_RUNS}/. Give the run a folder of its own, e.g. --output_dir outputs/run."
        )
    for flag, value in inputs.items():
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(folder):
            raise ValueError(
                f"--overwrite_output_dir would move {flag} {value} (inside --output_dir {output_dir}) to "
                f"{PREVIOUS_RUNS}/ before the run reads it. Give another --output_dir, or move it out first."
            )


def move_previous_run(output_dir: str | Path) -> Path | None:
    """Move every top-level entry of ``output_dir`` except previous-runs/ into previous-runs/<UTC time>/ (a new
    folder per call, even within the same microsecond). Returns that folder, or None when there was nothing to move.

    The entries are renamed one by one into previous-runs/.moving-<time>/, which is renamed to <time> once all are
    in; a crash in between is finished by the next call, into the same folder."""
    output_dir = Path(output_dir)
    entries = sorted(path for path in output_dir.iterdir() if path.name != PREVIOUS_RUNS)
    previous = output_dir / PREVIOUS_RUNS
    unfinished = sorted(previous.glob(f"{_MOVING}*")) if previous.is_dir() else []
    if not entries and not unfinished:
        return None
    moving = unfinished[0] if unfinished else _new_moving_folder(previous)
    for path in entries:
        path.rename(moving / path.name)
    final = previous / moving.name.removeprefix(_MOVING)
    moving.rename(final)
    return final


def _new_moving_folder(previous: Path) -> Path:
    previous.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}-{attempt}"
        if (previous / name).exists():
            continue
        try:
            (previous / f"{_MOVING}{name}").mkdir()
        except FileExistsError:
            continue
        return previous / f"{_MOVING}{name}"
    raise RuntimeError(f"no free folder name for {stamp} in {previous}")


# --- the final model: written aside, then swapped in ----------------------------------------------------------------
#
# Guarantee. The new model files are written into output_dir/.final-<run id>/ and fsynced; only then is swap.json
# written there (atomically): that is the commit. A crash or error before the commit leaves the top-level model files
# exactly as they were (the old set); the next start of a run on that output_dir deletes the staging folder. After
# the commit, the old set's files that the new set does not replace (the other kind: adapter vs full model, stale
# shards) are deleted and each new file is moved in with os.replace (atomic per file). A crash during those renames
# (no data is written then) can leave a mix on disk until the next start of a run on that output_dir (resume or
# --overwrite_output_dir), which completes the swap from swap.json before anything else: after a crash and a restart
# the top level holds exactly one set. Only a reader that opens output_dir between such a crash and the restart can
# see a mix.


def staging_dir(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / f"{STAGING_PREFIX}{run_id}"


def swap_in_final_model(staging: str | Path, output_dir: str | Path) -> list[str]:
    """Commit the complete new set in ``staging`` and move it into ``output_dir`` (see the guarantee above). Returns
    the names installed."""
    staging, output_dir = Path(staging), Path(output_dir)
    names = sorted(path.name for path in staging.iterdir())
    for name in names:
        _fsync(staging / name)
    _fsync(staging)
    stale = sorted(
        path.name
        for path in output_dir.iterdir()
        if path.is_file() and path.name not in names and any(fnmatch.fnmatchcase(path.name, p) for p in MODEL_FILES)
    )
    write_json(staging / SWAP_MANIFEST, {"install": names, "remove": stale})
    _apply_swap(staging, output_dir)
    return names


def finish_final_save(output_dir: str | Path) -> None:
    """Complete a committed swap a crash interrupted; delete a staging folder that never got to its commit."""
    for staging in sorted(Path(output_dir).glob(f"{STAGING_PREFIX}*")):
        if not staging.is_dir():
            continue
        if (staging / SWAP_MANIFEST).is_file():
            logger.warning("Completing the final-model swap a crash interrupted (%s).", staging)
            _apply_swap(staging, Path(output_dir))
        else:
            logger.warning(
                "Deleting %s: a final save that did not finish (the model files in place are kept).", staging
            )
            shutil.rmtree(staging)


def _apply_swap(staging: Path, output_dir: Path) -> None:
    """Idempotent: remove the stale files, move in the staged files still there, drop the staging folder."""
    manifest = json.loads((staging / SWAP_MANIFEST).read_text(encoding="utf-8"))
    for name in manifest["remove"]:
        (output_dir / name).unlink(missing_ok=True)
    for name in manifest["install"]:
        if os.path.lexists(staging / name):
            os.replace(staging / name, output_dir / name)
    _fsync(output_dir)
    shutil.rmtree(staging)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (best effort where the platform cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
