"""Failures across processes. Work one process does while the others wait (the image scan, the image cache, caption
scoring): its failure reaches every process, which then stops with the same message instead of waiting in a
collective until the timeout (30 minutes by default, for ever on some setups). A process or machine lost during
training: the others stop with a message that says so and how to continue (:func:`lost_contact_message`).

With ``accelerate launch`` on one machine, torchrun ends the other processes when one fails, but without the
reason; under ``srun``/``mpirun`` or across machines nothing does, and NCCL never notices a dead peer.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

T = TypeVar("T")


# What a collective raises when a peer is gone (gloo: "Connection closed by peer", "Connection reset by peer"; a hung
# peer: "Timed out waiting 1800000ms for recv operation"); NCCL and the c10d store raise torch.distributed.DistError.
_LOST_PEER = re.compile(r"gloo|nccl|connection (closed|reset) by peer|timed out waiting|broken pipe", re.IGNORECASE)


class LostProcessesError(RuntimeError):
    """Raised by a process whose collective failed because another process or machine of the run stopped."""


class MainProcessError(RuntimeError):
    """Raised on the other processes when the main process failed in ``run_on_main``."""


def run_on_main(fn: Callable[..., T], *args: Any, what: str = "work", **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the main process only; every process returns its result (broadcast: keep it
    small; a result that cannot be pickled is a failure like any other).

    When ``fn`` raises on the main process, the main process tells the others before raising the error itself;
    they raise ``MainProcessError`` naming ``what`` and the main process's error. With one process this is a plain
    call.
    """
    state = PartialState()
    if state.num_processes == 1:
        return fn(*args, **kwargs)
    outcome: list = [None]
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = fn(*args, **kwargs)
            outcome = [(True, pickle.dumps(result))]  # pickled here, so that a failure to pickle is shared too
        except Exception as caught:  # every failure is shared; KeyboardInterrupt & co. end the run as they are
            error = caught
            outcome = [(False, f"{type(caught).__name__}: {caught}")]
    broadcast_object_list(outcome, from_process=0)
    if error is not None:
        raise error
    if state.is_main_process:
        return result
    succeeded, payload = outcome[0]
    if not succeeded:
        raise MainProcessError(f"{what}: the main process failed, so this process stops too: {payload}")
    return pickle.loads(payload)


def end_processes() -> None:
    """Close this process's side of the process group of a multi-process run, at its end. Left to interpreter
    shutdown, gloo's threads could outlive their group and abort a process ("terminate called without an active
    exception", SIGABRT) after a successful run: about one run in ten here."""
    state = PartialState()
    if state.num_processes > 1:
        state.destroy_process_group()


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer died or hung (not a failure of this process)."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and _LOST_PEER.search(str(error)) is not None
    )


def lost_contact_message(
    error: BaseException, *, process: int, processes: int, step: int, timeout_s: float, checkpoint: Path | None
) -> str:
    """What a process that lost contact with the others during training says: which process, when, the collective's
    own words, where the cause is, and how to continue (``checkpoint``: the last complete one, if any)."""
    first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0].rstrip(".")  # gloo's "[file.cc:561] ..." prefix
    if checkpoint is None:
        resume = "No checkpoint was saved completely yet, so the run starts over when run again."
    else:
        resume = (
            f"The last complete checkpoint is {checkpoint}. Once the cause is fixed, run the same command with "
            "--resume_from_checkpoint latest to continue from it."
        )
    return (
        f"Process {process} of {processes} lost contact with the others after training step {step} ({cause}). "
        f"Another process or machine of the run failed, or hung for longer than --ddp_timeout ({timeout_s:g} s): its "
        f"own log holds the cause. {resume}"
    )
