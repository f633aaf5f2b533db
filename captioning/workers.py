"""Process pools that cannot deadlock, whatever the parent process did before it started them.

The hazard: once the parent has run a parallel torch op (resizing one full-size photo is enough), torch's OpenMP
thread pool exists in the parent; a forked child inherits the pool's state but not its threads, and its first
parallel op waits for them for ever (0 % CPU, no error). Tiny images never start the pool, which is how the default
run came to hang on ordinary 500x375 JPEGs.

The guard: every worker sets torch to one intra-op thread before it runs anything. With one thread torch never
opens a parallel region, so the inherited pool is never touched; this is the guard PyTorch's own DataLoader workers
use (training and ``caption_images.py`` rely on it too). It also is the right setting: N workers on N cores are the
parallelism, and N workers with N threads each would only fight over the cores.

Why not ``spawn``/``forkserver``, which start clean processes: each of their workers imports the entry script again
(``run_captioning.py`` and with it torch, transformers, peft: about 3 s per worker on 2 cores, per pool; CPython
3.11's forkserver does not preload ``__main__``), which made parallel preprocessing slower than one worker for any
dataset under a few thousand images. They remain the fallback where ``fork`` does not exist (Windows, macOS).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch


def start_method() -> str:
    """``fork`` on Linux (guarded as above); ``spawn`` where fork is missing or unsafe for other reasons (macOS)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def process_pool(
    max_workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``max_workers`` one-thread workers that never touch an inherited thread pool."""
    return ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=multiprocessing.get_context(start_method()),
        initializer=_start_worker,
        initargs=(initializer, initargs),
    )


def _start_worker(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    torch.set_num_threads(1)  # before any torch op in this process: see the module docstring
    if initializer is not None:
        initializer(*initargs)
