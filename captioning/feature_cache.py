"""Frozen image features computed once per run (--cache_image_features).

When nothing trains the image side and images are not augmented, an image's features are the same in every epoch
and every evaluation. One pass before training computes them where the family's image side ends and stores them, per
split, in memory-mapped files in the run's precision; training and evaluation batches then carry ``image_features``
instead of pixels, and the image side returns them without running (``FeatureFeed``). Where the image side ends:

- ``"module_output"`` (BLIP): the output of the family's ``image_feature_module`` (the vision tower's
  ``last_hidden_state``); the module's forward is replaced, its hooks (grouping, K/V sharing) still run.
- ``"get_image_features"`` (every other family): what the model's ``get_image_features`` returns, the features the
  language side reads (BLIP-2's projected Q-Former queries, PaliGemma's and Florence-2's projected patches, the chat
  VLMs' connector output, Qwen3-VL's deepstack layers too); that method is replaced on every module defining it.

An image's features are a record of named tensors whose first axis may differ between images (Qwen's dynamic
resolution, SmolVLM's tiles): a store keeps each name's tensors end to end with their offsets. Inputs that the
language side reads per image (Qwen's ``image_grid_thw``) and each image's placeholder count are stored with them.

A store is keyed by the images (paths and modification times), the whole image-processor configuration, the family,
a digest of the image side's weights and the dtype: any change builds a new one. It is built by the main process with
a progress bar and opened by the others; its size per image and in total is logged first, and a store that would not
fit in the free disk is refused with the size it needs. ``cache_image_features`` decides, for a run, whether the cache
applies (``feature_cache_off_reason``, then a probe: features that would carry a gradient mean the image side
trains) and builds or opens its stores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

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
from captioning.modeling import image_feature_module

logger = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 2
# How each dtype is stored: numpy has no bfloat16, so its bits are kept as int16 and viewed back.
_STORAGE = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int64: np.int64,
}
_DTYPES = {str(dtype): dtype for dtype in _STORAGE}
# How a field of get_image_features' output holds a batch: one tensor (B, ...), one tensor per image, or per layer
# one tensor per image (Qwen3-VL's deepstack features).
BATCHED, PER_IMAGE, PER_LAYER = "batched", "per_image", "per_layer"

Record = dict[str, torch.Tensor]


class FeatureStore:
    """Read-only cached features of one split's images: ``store[i]`` is image ``i``'s record (copies), and
    ``image_token_count(i)`` its placeholder count where it varies (else None)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.count = meta["count"]
        self.fields = {name: (_DTYPES[dtype], tuple(shape)) for name, (dtype, shape) in meta["fields"].items()}
        self.structure = meta["structure"]
        self.counts = meta.get("image_token_counts")
        self._arrays = None

    def _open(self) -> dict:
        if self._arrays is None:  # opened lazily: the object pickles cheaply into DataLoader workers
            offsets = np.load(self.folder / "offsets.npy")
            self._arrays = {}
            for column, (name, (dtype, shape)) in enumerate(self.fields.items()):
                rows = int(offsets[-1, column])
                array = (
                    np.memmap(self.folder / f"{name}.bin", dtype=_STORAGE[dtype], mode="r", shape=(rows, *shape))
                    if rows
                    else np.zeros((0, *shape), dtype=_STORAGE[dtype])
                )
                self._arrays[name] = (array, offsets[:, column])
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        record = {}
        for name, (array, offsets) in self._open().items():
            tensor = torch.from_numpy(np.array(array[offsets[index] : offsets[index + 1]]))
            record[name] = tensor.view(torch.bfloat16) if self.fields[name][0] == torch.bfloat16 else tensor
        return record

    def image_token_count(self, index: int):
        if self.counts is None:
            return None
        count = self.counts[int(index)]
        return tuple(count) if isinstance(count, list) else count

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f"{name}.bin").stat().st_size for name in self.fields)


def weights_digest(weights) -> str:
    """A digest of a module's parameters and buffers, or of (name, tensor) pairs (names, shapes, values): other
    weights, another store."""
    if isinstance(weights, torch.nn.Module):
        weights = [*weights.named_parameters(), *weights.named_buffers()]
    digest = hashlib.sha256()
    for name, tensor in weights:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def store_key(images_key: str, family: str, weights: str, dtype, processor_settings: dict | None = None) -> str:
    text = json.dumps(
        [FEATURE_CACHE_VERSION, images_key, family, weights, str(dtype), processor_settings or {}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def record_bytes(record: Record) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in record.values())


def build_feature_store(
    images: Sequence[dict],
    image_inputs: Callable[[list[dict]], tuple[dict[str, torch.Tensor], list | None]],
    compute: Callable[[dict[str, torch.Tensor]], tuple[list[Record], dict]],
    *,
    folder: Path,
    batch_size: int,
    show_progress: bool = True,
    description: str = "images",
    num_workers: int = 0,
) -> FeatureStore:
    """Run ``compute`` (image inputs -> one record per image, and how the family's output holds them) over
    ``images`` (rows with ``image``) in batches of ``batch_size``, into ``folder``; an existing complete store there
    is reused. ``image_inputs``: rows -> (inputs, each image's placeholder count or None), as
    ``CaptionCollator.processed_images``, run by ``num_workers`` DataLoader workers (0: this process) while this
    process computes."""
    if (folder / "meta.json").is_file():
        logger.info("Reusing the cached image features of the %s in %s", description, folder)
        return FeatureStore(folder)
    with torch.no_grad():
        first = compute(image_inputs([images[0]])[0])[0][0]
    per_image = record_bytes(first)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    logger.info(
        "Caching the image features of %d %s: %s, %s per image, %s in all, in %s",
        len(images),
        description,
        ", ".join(
            f"{name} {'x'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')}" for name, t in first.items()
        ),
        human_size(per_image),
        human_size(per_image * len(images)),
        folder,
    )
    check_free_space(per_image * len(images), folder.parent, f"image features of {len(images)} {description}")
    staging = folder.with_name(f"{folder.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    names = list(first)
    offsets = np.zeros((len(images) + 1, len(names)), dtype=np.int64)
    counts: list = []
    structure: dict = {}
    try:
        files = {name: open(staging / f"{name}.bin", "wb") for name in names}  # noqa: SIM115 (closed below)
        progress = tqdm(total=len(images), desc=f"Features of {description}", unit="img", disable=not show_progress)
        batches = torch.utils.data.DataLoader(
            images,
            batch_size=batch_size,
            collate_fn=image_inputs,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers else None,
        )
        with torch.no_grad(), progress as bar, contextlib.ExitStack() as closing:
            for file in files.values():
                closing.enter_context(file)
            for start, (inputs, batch_counts) in zip(range(0, len(images), batch_size), batches, strict=True):
                records, structure = compute(inputs)
                counts += batch_counts or []
                for i, record in enumerate(records, start=start):
                    for column, name in enumerate(names):
                        tensor = record[name].detach().to("cpu").contiguous()
                        if tensor.dtype == torch.bfloat16:
                            tensor = tensor.view(torch.int16)
                        files[name].write(tensor.numpy().tobytes())
                        offsets[i + 1, column] = offsets[i, column] + len(tensor)
                bar.update(len(records))
        np.save(staging / "offsets.npy", offsets)
        meta = {
            "count": len(images),
            "fields": {name: [str(first[name].dtype), list(first[name].shape[1:])] for name in names},
            "structure": structure,
            "image_token_counts": counts or None,
        }
        (staging / "meta.json").write_text(json.dumps(meta))
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


@dataclass
class CachedImageFeatures(ModelOutput):
    """``get_image_features``' output rebuilt from cached fields. The fields a family's forward reads but the cache
    does not keep (BLIP-2's Q-Former and vision outputs, returned only when asked for) are None."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | tuple | None = None
    deepstack_features: list | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    vision_outputs: ModelOutput | None = None
    qformer_outputs: ModelOutput | None = None


class FeatureFeed:
    """Where a family's image side ends, for the feature cache: ``records`` computes one record per image from a
    batch's image inputs (the store's build), ``fed`` makes the model take a batch's cached records instead of
    running the image side."""

    def __init__(self, model: torch.nn.Module, family: ModelFamily, layout):
        if family.feature_cache not in ("module_output", "get_image_features"):
            raise ValueError(f"{family.label} has no image feature cache")
        self.family = family
        self.layout = layout
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.module = image_feature_module(model, family)
        # Inputs the language side also reads per image (Qwen's image_grid_thw): stored with the features.
        self.kept_inputs = tuple(key for key in layout.image_input_keys if key != "pixel_values")
        self.structure: dict = {}  # how the stores' records make the output (set when they are opened)
        # The modules whose get_image_features is replaced, with that method's signature: found once, not per batch.
        self.feature_methods = [
            (module, inspect.signature(type(module).get_image_features.__get__(module)))
            for module in self.base.modules()
            if hasattr(type(module), "get_image_features")
        ]

    def image_side_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The weights that make the features (for the store's key): the image feature module's, or every weight
        outside the language side and its output layer."""
        if self.family.feature_cache == "module_output":
            return [*self.module.named_parameters(), *self.module.named_buffers()]
        language = (self.family.language_prefix, "lm_head.")
        named = [*self.base.named_parameters(), *self.base.named_buffers()]
        return [(name, tensor) for name, tensor in named if not name.startswith(language)]

    def records(self, inputs: dict[str, torch.Tensor]) -> tuple[list[Record], dict]:
        """One record per image of ``inputs`` (the collator's image inputs on the model's device), and how the
        output held them (the store keeps it to rebuild the output)."""
        if self.family.feature_cache == "module_output":
            output = self.module(pixel_values=inputs["pixel_values"])
            fields = self.family.cached_fields
            records = [{name: output[name][i] for name in fields} for i in range(len(inputs["pixel_values"]))]
            return records, dict.fromkeys(fields, BATCHED)
        output = self.base.get_image_features(**inputs, return_dict=True)
        count = len(inputs["image_grid_thw"] if "image_grid_thw" in inputs else inputs["pixel_values"])
        records: list[Record] = [{} for _ in range(count)]
        structure = {}
        for name in self.family.cached_fields:
            value = output[name]
            if isinstance(value, torch.Tensor):
                structure[name] = BATCHED
                for i, record in enumerate(records):
                    record[name] = value[i]
            elif value and isinstance(value[0], torch.Tensor):
                structure[name] = PER_IMAGE
                for i, record in enumerate(records):
                    record[name] = value[i]
            else:
                structure[name] = [PER_LAYER, len(value)]
                for layer, per_image in enumerate(value):
                    for i, record in enumerate(records):
                        record[f"{name}.{layer}"] = per_image[i]
        for key in self.kept_inputs:
            for i, record in enumerate(records):
                record[key] = inputs[key][i : i + 1]
        return records, structure

    def output(self, records: Sequence[Record], structure: dict):
        """The image side's output for ``records`` (one per image, in batch order)."""
        if self.family.feature_cache == "module_output":
            return BaseModelOutputWithPooling(**{name: torch.stack([r[name] for r in records]) for name in structure})
        output = CachedImageFeatures()
        for name, kind in structure.items():
            if kind == BATCHED:
                output[name] = torch.stack([record[name] for record in records])
            elif kind == PER_IMAGE:
                output[name] = tuple(record[name] for record in records)
            else:
                output[name] = [tuple(record[f"{name}.{layer}"] for record in records) for layer in range(kind[1])]
        return output

    @contextlib.contextmanager
    def fed(self, inputs: dict, image_group: torch.Tensor | None):
        """``inputs`` of a batch that carries cached records (``image_features``, one per image; with
        ``image_group`` one per distinct image) rewritten for the model, while its image side returns them instead
        of running: yields (inputs, image_group). ``pixel_values`` becomes a stand-in of the shape ``generate``
        expands per beam (one element per image, or per patch where ``image_grid_thw`` counts them). Where grouped
        batches share features through a hook on a module that no longer runs, the records are repeated per row
        here and ``image_group`` is consumed."""
        inputs = dict(inputs)
        records = list(inputs.pop("image_features"))
        if self.family.feature_cache == "module_output":
            inputs["pixel_values"] = records[0][self.family.cached_fields[0]].new_zeros(len(records), 1, 1, 1)
            with substituted(self.module, "forward", lambda *args, **kwargs: self.output(records, self.structure)):
                yield inputs, image_group
            return
        if image_group is not None and self.layout.grouping_by == "hook":
            records, image_group = [records[i] for i in image_group.tolist()], None
        first = next(iter(records[0].values()))
        if "image_grid_thw" in inputs:
            patches = int(inputs["image_grid_thw"].prod(-1).sum())
            inputs["pixel_values"] = torch.zeros(patches, 1, device=first.device)
        else:
            inputs["pixel_values"] = torch.zeros(len(records), 1, 1, 1, device=first.device)
        with contextlib.ExitStack() as stack:
            if self.family.feature_path:  # BLIP-2's generate: tower and Q-Former, then the projection, by hand
                placeholder = BaseModelOutputWithPooling(last_hidden_state=first.new_zeros(len(records), 1, 1))
                for name in self.family.feature_path:
                    module = self.base.get_submodule(name)
                    stack.enter_context(substituted(module, "forward", lambda *args, **kwargs: placeholder))
                projected = self.output(records, self.structure).pooler_output
                stack.enter_context(substituted(self.module, "forward", lambda *args, **kwargs: projected))
            for module, signature in self.feature_methods:
                replacement = self._replacement(module, signature, records)
                stack.enter_context(substituted(module, "get_image_features", replacement))
            yield inputs, image_group

    def _replacement(self, module, signature: inspect.Signature, records: list[Record]):
        """``module.get_image_features`` returning ``records``' output, with the original's signature (Florence-2's
        generate reads it to pick the arguments it passes)."""
        original = type(module).get_image_features.__get__(module)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments
            images = given.get("image_grid_thw")
            count = len(images if images is not None else given["pixel_values"])
            if count % len(records):
                raise RuntimeError(f"get_image_features was asked for {count} images of a batch of {len(records)}")
            per_call = count // len(records)  # generate repeats each image once per beam
            return self.output([record for record in records for _ in range(per_call)], self.structure)

        return get_image_features


@contextlib.contextmanager
def substituted(module: torch.nn.Module, method: str, replacement: Callable):
    """While active, ``module.<method>`` is ``replacement`` (a forward's hooks still run around it)."""
    had_own = method in module.__dict__
    original = module.__dict__.get(method)
    setattr(module, method, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(module, method, original)
        else:
            delattr(module, method)


# --- the run's stores (run_captioning.py) ---------------------------------------------------------------------


TRAINING_IMAGE_SIDE = "the image side trains (--lora_vision, or full fine-tuning without --freeze_vision_tower)"


def feature_cache_off_reason(args, family: ModelFamily) -> str | None:
    """Why --cache_image_features cannot apply to this run, from its flags (None: it may; whether the image side
    trains is probed on the model by ``cache_image_features``)."""
    if family.feature_cache is None:
        return f"{family.label} has no image feature cache"
    if args.data.image_augmentation != "none":
        return f"--image_augmentation {args.data.image_augmentation} changes the images every epoch"
    if args.data.streaming:
        return "--streaming reads each training image once as it comes"
    if args.caption.training_objective == "scst":
        return "--training_objective scst samples from the images' pixels"
    lora = args.lora
    if args.training.do_train and (
        (lora.use_lora and lora.lora_vision) or not (lora.use_lora or lora.freeze_vision_tower)
    ):
        return TRAINING_IMAGE_SIDE
    training = args.training
    launched_sharded = any(
        os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true") for engine in ("FSDP", "DEEPSPEED")
    )
    if training.deepspeed or training.fsdp or launched_sharded:
        return "DeepSpeed and FSDP shard the weights that would compute the features"
    return None


def cache_image_features(args, splits: dict, caches: dict, collator, model, family: ModelFamily, layout):
    """--cache_image_features for a run (``args``: run_captioning's parsed argument groups): each training and
    validation image's features, computed once by the main process on its device and opened by the others.
    Returns ({split: FeatureStore}, the FeatureFeed that feeds them), ({}, None) when off (the log says why)."""
    wanted = args.data.cache_image_features
    if wanted is False:
        return {}, None
    reason = feature_cache_off_reason(args, family)
    if reason is None and not any(name in splits for name in ("train", "validation")):
        reason = "no training or validation images"
    feed = None if reason else FeatureFeed(model, family, layout)
    training = args.training
    if feed is not None:
        movable = feed.module if family.feature_cache == "module_output" else model
        if all(parameter.device.type == "cpu" for parameter in movable.parameters()):
            movable.to(training.device)  # where the Trainer puts the model: the features are computed there
        device = next(feed.module.parameters()).device
        precision = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None

        def compute(image_inputs: dict) -> tuple[list[Record], dict]:
            image_inputs = {key: value.to(device) for key, value in image_inputs.items()}
            if family.feature_cache == "module_output":  # called directly, not through the model's forward
                pixels = image_inputs["pixel_values"]
                image_inputs["pixel_values"] = pixels.to(next(feed.module.parameters()).dtype)
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                records, structure = feed.records(image_inputs)
            # Kept in the run's precision: under autocast the layers that read them compute in it anyway.
            if precision is not None:
                records = [
                    {k: v.to(precision) if v.is_floating_point() else v for k, v in record.items()}
                    for record in records
                ]
            return records, structure

        name = "train" if "train" in splits else "validation"
        probe = CaptionImages(splits[name], caches.get(name))
        with torch.enable_grad():
            records, _ = compute(collator.processed_images([probe[0]])[0])
        if any(tensor.requires_grad for tensor in records[0].values()):
            reason = TRAINING_IMAGE_SIDE
            feed = None
    if feed is None:
        if wanted:
            raise ValueError(f"--cache_image_features true cannot apply: {reason}. Drop the flag.")
        logger.info("Image features are computed in every step (no feature cache): %s.", reason)
        return {}, None
    weights = weights_digest(feed.image_side_tensors())
    settings = collator.image_processor.to_dict()

    def build() -> dict:
        was_training = model.training
        model.eval()
        stores = {}
        for name in ("train", "validation"):
            if name not in splits:
                continue
            images = CaptionImages(splits[name], caches.get(name))
            key = store_key(
                cache_key(splits[name], collator.image_processor),
                family.name,
                weights,
                f"{precision}/{device.type}",
                settings,
            )
            stores[name] = build_feature_store(
                images,
                collator.processed_images,
                compute,
                folder=Path(args.data.image_cache_dir or default_cache_root()) / "features" / key,
                batch_size=training.per_device_eval_batch_size,
                show_progress=training.should_log and not training.disable_tqdm,
                description=f"{name} images",
                num_workers=training.dataloader_num_workers,
            )
        model.train(was_training)
        return stores

    stores = run_on_main(build, what="Caching the image features")
    if not PartialState().is_main_process:
        stores = build()  # opens the main process's stores
    feed.structure = next(iter(stores.values())).structure
    logger.info("Image features cached: training and evaluation run without the image side (%s).", family.label)
    return stores, feed
