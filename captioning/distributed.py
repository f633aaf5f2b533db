"""Work one process does while the others wait (the image scan, the image cache, caption scoring): its failure
reaches every process, which then stops with the same message instead of waiting in a collective until the
timeout (30 minutes by default, for ever on some setups).

With ``accelerate launch`` on one machine, torchrun ends the other processes when one fails, but without the
reason; under ``srun``/``mpirun`` or across machines nothing does, and NCCL never notices a dead peer.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
