"""Frozen image features computed once per run (--cache_image_features).

When nothing trains the image side and images are not augmented, an image's features are the same in every epoch
and every evaluation. One pass before training computes them at the family's ``image_feature_module`` boundary
(BLIP: the vision tower's ``last_hidden_state``) and stores them, per split, in a memory-mapped file in the run's
precision; training and evaluation batches then carry ``image_features`` instead of pixels, and the module returns
them without running (``substituted_output``).

A store is keyed by the images (the preprocessing cache's key: paths and modification times, resize settings), the
family, a digest of the image side's weights and the dtype: any change builds a new one. It is built by the main
process with a progress bar and opened by the others; its size per image and in total is logged first, and a store
that would not fit in the free disk is refused with the size it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from captioning.image_cache import STAGING_MARK, check_free_space, remove_stale_staging

logger = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
# How each dtype is stored: numpy has no bfloat16, so its bits are kept as int16 and viewed back.
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
_DTYPES = {str(dtype): dtype for dtype in _STORAGE}


class FeatureStore:
    """Read-only features (N, *shape) of one split's images; ``store[i]`` is image ``i``'s tensor (a copy)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.shape = tuple(meta["shape"])
        self.dtype = _DTYPES[meta["dtype"]]
        self._array = None

    def _features(self) -> np.memmap:
        if self._array is None:  # opened lazily: the object pickles cheaply into DataLoader workers
            self._array = np.memmap(
                self.folder / "features.bin", dtype=_STORAGE[self.dtype], mode="r", shape=self.shape
            )
        return self._array

    def __getstate__(self):
        return {"folder": self.folder, "shape": self.shape, "dtype": self.dtype, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(self._features()[int(index)]))
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, values): other weights, another store."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def store_key(images_key: str, family: str, weights: str, dtype: torch.dtype) -> str:
    text = json.dumps([FEATURE_CACHE_VERSION, images_key, family, weights, str(dtype)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def build_feature_store(
    images: Sequence[dict],
    image_inputs: Callable[[list[dict]], dict[str, torch.Tensor]],
    compute: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    folder: Path,
    batch_size: int,
    show_progress: bool = True,
    description: str = "images",
) -> FeatureStore:
    """Run ``compute`` (image inputs -> features (B, ...)) over ``images`` (rows with ``image``) in batches of
    ``batch_size``, into ``folder``; an existing complete store there is reused."""
    if (folder / "meta.json").is_file():
        logger.info("Reusing the cached image features of the %s in %s", description, folder)
        return FeatureStore(folder)
    with torch.no_grad():
        first = compute(image_inputs([images[0]]))[0]
    shape, dtype = (len(images), *first.shape), first.dtype
    per_image = first.numel() * first.element_size()
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    logger.info(
        "Caching the image features of %d %s: %s %s per image, %.1f MiB per image, %.2f GiB in all, in %s",
        len(images),
        description,
        "x".join(map(str, first.shape)),
        str(dtype).removeprefix("torch."),
        per_image / 2**20,
        per_image * len(images) / 2**30,
        folder,
    )
    check_free_space(per_image * len(images), folder.parent, f"image features of {len(images)} {description}")
    staging = folder.with_name(f"{folder.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        array = np.memmap(staging / "features.bin", dtype=_STORAGE[dtype], mode="w+", shape=shape)
        progress = tqdm(total=len(images), desc=f"Features of {description}", unit="img", disable=not show_progress)
        with torch.no_grad(), progress as bar:
            for start in range(0, len(images), batch_size):
                rows = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                features = compute(image_inputs(rows)).detach().to("cpu", dtype)
                if dtype == torch.bfloat16:
                    features = features.view(torch.int16)
                array[start : start + len(rows)] = features.numpy()
                bar.update(len(rows))
        array.flush()
        del array
        (staging / "meta.json").write_text(json.dumps({"shape": list(shape), "dtype": str(dtype)}))
        os.replace(staging, folder)  # complete stores appear whole
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FeatureStore(folder)


@contextlib.contextmanager
def substituted_output(module: torch.nn.Module, output):
    """While active, calling ``module`` returns ``output`` without running it (its forward hooks still run)."""
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward
