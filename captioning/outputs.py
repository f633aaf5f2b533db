"""Files a run leaves in output_dir besides the Trainer's own: predictions.jsonl and result files."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A temporary file in the destination folder that replaces ``path`` once written: a crash never leaves half
    a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs are ordinary files
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_predictions(
    path: str | Path, image_ids: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> None:
    """One JSON line per image: ``{"image": ..., "prediction": ..., "references": [...]}``."""
    if not len(image_ids) == len(predictions) == len(references):
        raise ValueError(
            f"predictions.jsonl: {len(image_ids)} images, {len(predictions)} predictions, {len(references)} references"
        )
    lines = [
        json.dumps({"image": image, "prediction": prediction, "references": list(refs)}, ensure_ascii=False)
        for image, prediction, refs in zip(image_ids, predictions, references, strict=True)
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


CAPTIONING_CONFIG = "captioning_config.json"


def write_captioning_config(
    output_dir: str | Path,
    *,
    family: str,
    base_model: str,
    caption_prompt: str,
    generation_kwargs: dict,
    max_caption_length: int,
) -> None:
    """What inference needs to caption like training did: the prompt, the family and the generation settings."""
    write_json(
        Path(output_dir) / CAPTIONING_CONFIG,
        {
            "family": family,
            "base_model": base_model,
            "caption_prompt": caption_prompt,
            "generation": generation_kwargs,
            "max_caption_length": max_caption_length,
        },
    )


def read_captioning_config(model_dir: str | Path) -> dict | None:
    """The ``captioning_config.json`` of a run's output_dir, or None if the folder has none."""
    path = Path(model_dir) / CAPTIONING_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
