"""Frozen image features computed once per run (--cache_image_features).

When nothing trains the image side and images are not augmented, an image's features are the same in every epoch
and every evaluation. One pass before training computes them at the family's ``image_feature_module`` boundary
(BLIP: the vision tower's ``last_hidden_state``) and stores them, per split, in a memory-mapped file in the run's
precision; training and evaluation batches then carry ``image_features`` instead of pixels, and the module returns
them without running (``substituted_output``).

A store is keyed by the images (the preprocessing cache's key: paths and modification times, resize settings), the
family, a digest of the image side's weights and the dtype: any change builds a new one. It is built by the main
process with a progress bar and opened by the others; its size per image and in total is logged first, and a store
that would not fit in the free disk is refused with the size it needs. ``cache_image_features`` decides, for a
run, whether the cache applies (``feature_cache_off_reason``) and builds or opens its stores.
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
from accelerate import PartialState
from tqdm.auto import tqdm

from captioning.data import CaptionImages
from captioning.distributed import run_on_main
from captioning.families import ModelFamily
from captioning.image_cache import (
    STAGING_MARK,
    cache_key,
    check_free_space,
    default_cache_root,
    remove_stale_staging,
)
from captioning.modeling import image_feature_module, vision_tower_frozen

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
        "Caching the image features of %d %s: %s %s, %s per image, %s in all, in %s",
        len(images),
        description,
        "x".join(map(str, first.shape)),
        str(dtype).removeprefix("torch."),
        human_size(per_image),
        human_size(per_image * len(images)),
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


def human_size(size: float) -> str:
    """``812 B``, ``4.3 KiB``, ``1.7 MiB``, ``13.4 GiB``."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


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


# --- the run's stores (run_captioning.py) ---------------------------------------------------------------------


def feature_cache_off_reason(args, family: ModelFamily, model=None) -> str | None:
    """Why --cache_image_features cannot apply to this run (None: it can); without ``model``, what the flags
    alone tell."""
    if family.cached_feature is None:
        return f"{family.label} has no image feature cache yet (BLIP has)"
    if not family.fixed_image_size:
        return f"{family.label} keeps each image at its own size"
    if args.data.image_augmentation != "none":
        return f"--image_augmentation {args.data.image_augmentation} changes the images every epoch"
    if args.data.streaming:
        return "--streaming reads each training image once as it comes"
    if args.caption.training_objective == "scst":
        return "--training_objective scst samples from the images' pixels"
    if model is not None and not vision_tower_frozen(model, family):
        return "the image side trains (--lora_vision or full fine-tuning without --freeze_vision_tower)"
    return None


def cache_image_features(args, splits: dict, caches: dict, collator, model, family: ModelFamily) -> dict:
    """--cache_image_features for a run (``args``: run_captioning's parsed argument groups): each training and
    validation image's features, computed once by the main process on its device and opened by the others, as
    {split: FeatureStore}; {} when off (the log says why)."""
    wanted = args.data.cache_image_features
    if wanted is False:
        return {}
    reason = feature_cache_off_reason(args, family, model)
    if reason is not None:
        if wanted:
            raise ValueError(f"--cache_image_features true cannot apply: {reason}. Drop the flag.")
        logger.info("Image features are computed in every step (no feature cache): %s.", reason)
        return {}
    training = args.training
    module = image_feature_module(model, family)
    if all(parameter.device.type == "cpu" for parameter in module.parameters()):
        module.to(training.device)  # where the Trainer puts the model: the features are computed there
    device = next(module.parameters()).device
    precision = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None
    weights = weights_digest(module)

    def compute(image_inputs: dict) -> torch.Tensor:
        pixels = image_inputs["pixel_values"].to(device, next(module.parameters()).dtype)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            features = module(pixel_values=pixels)[family.cached_feature]
        # Kept in the run's precision: under autocast the layers that read them compute in it anyway.
        return features if precision is None else features.to(precision)

    def build() -> dict:
        module.eval()
        stores = {}
        for name in ("train", "validation"):
            if name not in splits:
                continue
            images = CaptionImages(splits[name], caches.get(name))
            key = store_key(
                cache_key(splits[name], collator.image_processor), family.name, weights, f"{precision}/{device.type}"
            )
            stores[name] = build_feature_store(
                images,
                collator.image_inputs,
                compute,
                folder=Path(args.data.image_cache_dir or default_cache_root()) / "features" / key,
                batch_size=training.per_device_eval_batch_size,
                show_progress=training.should_log and not training.disable_tqdm,
                description=f"{name} images",
            )
        return stores

    stores = run_on_main(build, what="Caching the image features")
    if not PartialState().is_main_process:
        stores = build()  # opens the main process's stores
    logger.info("Image features cached: training and evaluation run without the image side (%s).", family.label)
    return stores
