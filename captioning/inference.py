"""Captioning with what a training run wrote: load its LoRA adapter or full model with the run's prompt and
generation settings, caption images (in memory or files through a DataLoader), and merge an adapter into a
standalone model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, PreTrainedModel
from transformers.utils import cached_file

from captioning.arguments import CaptioningArguments
from captioning.families import ModelFamily, check_config_json, detect_family
from captioning.images import load_image
from captioning.layout import CaptionLayout
from captioning.outputs import CAPTIONING_CONFIG, write_captioning_config
from captioning.trainer import build_generation_kwargs, generation_inputs
from collators import CaptionCollator, build_layout

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Files of another model or adapter that must not survive next to a merged model (--overwrite_output_dir).
STALE_WEIGHT_PATTERNS = (
    "adapter_config.json",
    "adapter_model*",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
DEFAULT_MAX_CAPTION_LENGTH = 64


# --------------------------------------------------------------------------------------------------------------
# What a model path holds
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A run's output (or any checkpoint): a LoRA adapter and the base it applies to, or a full model."""

    path: str
    base_model: str | None  # None for a full model
    processor_path: str
    settings: dict | None  # captioning_config.json, when the folder has one

    @property
    def is_adapter(self) -> bool:
        return self.base_model is not None


def resolve_model_source(model_path: str | os.PathLike, base_model: str | None = None) -> ModelSource:
    """Tell an adapter folder from a model folder (or Hub id) and find the base model and processor to use.

    The base of an adapter is ``base_model`` if given, else ``base_model_name_or_path`` of its adapter_config.json,
    else ``base_model`` of its captioning_config.json. The processor comes from the adapter folder when it has
    processor files (training runs save them), else from the base.
    """
    path = str(model_path)
    check_model_path(path)
    settings = _read_json(_find(path, CAPTIONING_CONFIG))
    adapter_config = _read_json(_find(path, ADAPTER_CONFIG))
    if adapter_config is None:
        if _find(path, MODEL_CONFIG) is None:
            raise ValueError(not_a_model_message(path))
        return ModelSource(path=path, base_model=None, processor_path=path, settings=settings)
    base = base_model or adapter_config.get("base_model_name_or_path") or (settings or {}).get("base_model")
    if not base:
        raise ValueError(f"{path}: the adapter does not name its base model; pass --base_model ID_OR_PATH.")
    has_processor = any(_find(path, name) is not None for name in PROCESSOR_FILES)
    return ModelSource(
        path=path, base_model=str(base), processor_path=path if has_processor else str(base), settings=settings
    )


def not_a_model_message(path: str) -> str:
    if Path(path).is_dir():
        return (
            f"{path}: neither a LoRA adapter (no {ADAPTER_CONFIG}) nor a model (no {MODEL_CONFIG}). Pass the "
            "output_dir of a training run, a merged model folder, or a Hub model id."
        )
    return (
        f"{path}: no such local folder, and no Hub model of that name could be reached (a typo, or offline with "
        "HF_HUB_OFFLINE=1 and not in the cache?). Pass the output_dir of a training run or a Hub model id."
    )


def check_model_path(path: str) -> None:
    """A path that looks local but does not exist is a typo, not a Hub id: say so before the Hub is asked."""
    if Path(path).exists():
        if not Path(path).is_dir():
            raise ValueError(f"{path}: is a file; pass the folder that holds the model or adapter.")
        return
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or "\\" in path
    if looks_local:
        raise FileNotFoundError(f"{path}: no such folder. Pass the output_dir of a training run or a Hub model id.")


def _find(path: str, filename: str) -> Path | None:
    """``filename`` inside a local folder or a Hub repository (cached or downloadable), or None if it has none."""
    if Path(path).is_dir():
        candidate = Path(path) / filename
        return candidate if candidate.is_file() else None
    found = cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )
    return Path(found) if found else None


def _read_json(path: Path | None) -> dict | None:
    return None if path is None else json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Captioner
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Captioner:
    """A loaded captioner: the model, its processor, and the caption layout and generation settings of its run."""

    model: PreTrainedModel | PeftModel
    processor: Any
    family: ModelFamily
    layout: CaptionLayout
    caption_prompt: str
    generation_kwargs: dict
    max_caption_length: int = DEFAULT_MAX_CAPTION_LENGTH
    collator: CaptionCollator = field(init=False, repr=False)

    def __post_init__(self):
        self.collator = CaptionCollator(
            self.processor.image_processor, self.processor.tokenizer, self.layout, self.max_caption_length
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def caption(self, images: Sequence[Image.Image], **overrides) -> list[str]:
        """One caption per image, in order. Keyword arguments override generation settings (``num_beams=1``)."""
        if not images:
            return []
        rows = [{"image": load_image(image), "image_index": i} for i, image in enumerate(images)]
        return self.generate(self.collator.collate_generation(rows), **overrides)

    def generate(self, batch: dict[str, torch.Tensor], **overrides) -> list[str]:
        """Captions for a ``CaptionCollator.collate_generation`` batch (pixel values + prompt), decoded."""
        kwargs = self.generation_settings(**overrides)
        with torch.inference_mode():
            inputs = {key: value.to(self.device) for key, value in generation_inputs(batch).items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            sequences = self.model.generate(**inputs, **kwargs)
            tokens = self.layout.caption_tokens(sequences, inputs["input_ids"])
        return self.layout.decode_captions(tokens.cpu(), self.processor.tokenizer)

    def generation_settings(self, **overrides) -> dict:
        """The run's generation settings with ``overrides`` (None values ignored) on top.

        A ``max_new_tokens`` override below the run's ``min_new_tokens`` lowers the minimum to match.
        """
        overrides = {key: value for key, value in overrides.items() if value is not None}
        kwargs = {**self.generation_kwargs, **overrides}
        if "max_new_tokens" in overrides and "min_new_tokens" not in overrides:
            kwargs["min_new_tokens"] = min(kwargs.get("min_new_tokens") or 0, kwargs["max_new_tokens"])
        if (kwargs.get("min_new_tokens") or 0) > kwargs.get("max_new_tokens", float("inf")):
            raise ValueError(
                f"--min_new_tokens {kwargs['min_new_tokens']} exceeds max_new_tokens {kwargs['max_new_tokens']} "
                "(the run's setting unless given): lower --min_new_tokens or raise --max_new_tokens."
            )
        return kwargs


def load_captioner(
    model_path: str | os.PathLike,
    *,
    base_model: str | None = None,
    merge: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    caption_prompt: str | None = None,
) -> Captioner:
    """Load a run's output_dir (adapter or full model), a merged model or a Hub checkpoint, ready to caption.

    ``merge`` folds a LoRA adapter into the base weights (faster generation, same captions). The prompt and
    generation settings come from the folder's captioning_config.json, else the family's defaults;
    ``caption_prompt`` replaces the prompt (``""`` for none).
    """
    source = resolve_model_source(model_path, base_model)
    config = load_config(source)
    family = detect_family(config)
    if merge and source.is_adapter:
        check_mergeable(config, source)
    model = load_model(source, family, resolve_dtype(dtype))
    if merge and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.to(resolve_device(device)).eval()
    processor = AutoProcessor.from_pretrained(source.processor_path)
    return build_captioner(model, processor, family, source.settings, caption_prompt)


def build_captioner(
    model, processor, family: ModelFamily, settings: dict | None, caption_prompt: str | None = None
) -> Captioner:
    """Layout and generation settings of a run (its captioning_config.json) around a loaded model."""
    settings = settings or {}
    if settings.get("family") not in (None, family.name):
        logger.warning(
            "%s says family %r but the model is %r; using %r.",
            CAPTIONING_CONFIG,
            settings["family"],
            family.name,
            family.name,
        )
    prompt = family.prompt(settings.get("caption_prompt") if caption_prompt is None else caption_prompt)
    generation = {**default_generation_kwargs(family), **settings.get("generation", {})}
    return Captioner(
        model=model,
        processor=processor,
        family=family,
        layout=build_layout(family, model.config, processor, prompt),
        caption_prompt=prompt,
        generation_kwargs=generation,
        max_caption_length=settings.get("max_caption_length", DEFAULT_MAX_CAPTION_LENGTH),
    )


def default_generation_kwargs(family: ModelFamily) -> dict:
    """What training uses when no generation flag is given: the family's LAVIS defaults."""
    return build_generation_kwargs(CaptioningArguments(), family)


def load_config(source: ModelSource):
    """The model's config (the base's, for an adapter); a base that cannot be found gets a --base_model hint."""
    path = source.base_model if source.is_adapter else source.path
    try:
        raw = _read_json(_find(path, MODEL_CONFIG)) or {}
    except (OSError, ValueError):  # AutoConfig below says why
        raw = {}
    check_config_json(raw, path)  # a checkpoint that needs remote code: an error naming the native one
    if not source.is_adapter:
        return AutoConfig.from_pretrained(source.path)
    try:
        return AutoConfig.from_pretrained(source.base_model)
    except OSError as error:
        raise OSError(
            f"{source.path}: could not load its base model {source.base_model!r} ({error}). Pass --base_model with "
            "the local folder or Hub id of the checkpoint the adapter was trained on."
        ) from error


def load_model(source: ModelSource, family: ModelFamily, dtype) -> PreTrainedModel | PeftModel:
    """The full model, or the base in the family's class with the adapter on top (not merged)."""
    if not source.is_adapter:
        return family.model_class.from_pretrained(source.path, dtype=dtype)
    base = family.model_class.from_pretrained(source.base_model, dtype=dtype)
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` alias; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, source.path)


def check_mergeable(config, source: ModelSource) -> None:
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"--base_model {source.base_model}: a quantized (8-bit/4-bit) checkpoint; LoRA cannot be merged into "
            "quantized weights. Point --base_model at the full-precision checkpoint the quantized one came from."
        )


def resolve_dtype(dtype: str | torch.dtype | None):
    """``--dtype`` as ``from_pretrained`` takes it: "auto" (the checkpoint's dtype) or a torch dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------------------
# Captioning files
# --------------------------------------------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """Image files opened in DataLoader workers. An unreadable file gives ``image=None`` and the reason in ``error``
    (truncated, empty, not an image, missing): one bad file never stops a worker."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            return {"path": path, "image": load_image(path), "error": None}
        except Exception as error:  # any decoding failure is reported, never raised in a worker
            return {"path": path, "image": None, "error": describe_error(path, error)}


def describe_error(path: str, error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return "empty file (0 bytes)"
    return f"{type(error).__name__}: {error}"


class GenerationBatches:
    """DataLoader ``collate_fn``: readable rows become a generation batch (in the worker), unreadable ones are
    passed on as ``failed`` (path, reason) pairs."""

    def __init__(self, collator: CaptionCollator):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        readable = [row for row in rows if row["image"] is not None]
        batch = None
        if readable:
            batch = self.collator.collate_generation(
                [{"image": row["image"], "image_index": i} for i, row in enumerate(readable)]
            )
        return {
            "paths": [row["path"] for row in readable],
            "failed": [(row["path"], row["error"]) for row in rows if row["image"] is None],
            "batch": batch,
        }


@dataclass
class FileCaptions:
    """Result of captioning files: ``(path, caption)`` in input order, and ``(path, reason)`` of skipped files."""

    captions: list[tuple[str, str]]
    skipped: list[tuple[str, str]]


def printable_path(path: str) -> str:
    """A file name as text that any log or file takes: bytes that are not UTF-8 (the surrogate escapes
    ``os.listdir`` gives them) written as ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def caption_files(
    captioner: Captioner,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
    on_captions: Callable[[list[tuple[str, str]]], None] | None = None,
    **overrides,
) -> FileCaptions:
    """Caption image files in batches; workers decode the next batches while the model generates.

    Unreadable files are logged (path and reason) and skipped. ``on_captions`` receives each batch's
    ``(path, caption)`` pairs as soon as they are generated (to write them as the run goes).
    """
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=GenerationBatches(captioner.collator),
    )
    result = FileCaptions(captions=[], skipped=[])
    with tqdm(total=len(paths), unit="image", desc="Captioning", disable=not progress) as bar:
        for item in loader:
            for path, reason in item["failed"]:
                logger.warning("Skipping unreadable image %s: %s", printable_path(path), reason)
            result.skipped += item["failed"]
            if item["batch"] is not None:
                captions = list(zip(item["paths"], captioner.generate(item["batch"], **overrides), strict=True))
                if on_captions is not None:
                    on_captions(captions)
                result.captions += captions
            bar.update(len(item["paths"]) + len(item["failed"]))
    return result


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite_output_dir: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base and save a standalone model that loads with the plain transformers class.

    ``output_dir`` receives the model (safetensors), the processor and captioning_config.json. The base is loaded
    in full precision (``dtype``, default: the checkpoint's own); quantized bases cannot be merged into.
    """
    output_dir = Path(output_dir)
    source = resolve_model_source(adapter_dir, base_model)
    if not source.is_adapter:
        raise ValueError(
            f"{adapter_dir}: holds a full model ({MODEL_CONFIG}), not a LoRA adapter; there is nothing to merge. "
            "Caption with it directly (caption_images.py --model ...)."
        )
    check_merge_output_dir(output_dir, Path(adapter_dir), overwrite_output_dir)
    captioner = load_captioner(adapter_dir, base_model=base_model, merge=True, device="cpu", dtype=dtype)
    logger.info("Merged %s into %s", adapter_dir, source.base_model)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".tmp"))
    try:
        save_captioner(captioner, staging, base_model=source.base_model)
        for path in [staging, *staging.iterdir()]:
            give_default_permissions(path)
        install_folder(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote the merged model to %s", output_dir)
    return output_dir


def check_merge_output_dir(output_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Never write over the adapter itself, nor over anything else without --overwrite_output_dir."""
    if output_dir.resolve() == adapter_dir.resolve():
        raise ValueError(
            f"--output_dir {output_dir} is the adapter folder; the merged model needs a folder of its own."
        )
    if not output_dir.is_dir() or overwrite:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        return
    existing = sorted(path.name for path in output_dir.iterdir())
    if existing:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise ValueError(
            f"--output_dir {output_dir} is not empty ({shown}). Choose another --output_dir or pass "
            "--overwrite_output_dir to replace the model there."
        )


def save_captioner(captioner: Captioner, output_dir: Path, *, base_model: str) -> None:
    """Model weights (safetensors), processor files and the captioning_config.json that reproduces the run."""
    captioner.model.save_pretrained(output_dir)
    captioner.processor.save_pretrained(output_dir)
    write_captioning_config(
        output_dir,
        family=captioner.family.name,
        base_model=base_model,
        caption_prompt=captioner.caption_prompt,
        generation_kwargs=captioner.generation_kwargs,
        max_caption_length=captioner.max_caption_length,
    )


def install_folder(staging: Path, output_dir: Path) -> None:
    """Move a fully written folder into place; in an existing folder, weights of an earlier model go first."""
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    for pattern in STALE_WEIGHT_PATTERNS:
        for stale in output_dir.glob(pattern):
            if stale.is_file():
                stale.unlink()
    for path in staging.iterdir():
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


def give_default_permissions(path: Path) -> None:
    """Temporary files and folders are created owner-only; give ``path`` the mode a plain ``open``/``mkdir`` would
    (0666 / 0777 less the umask), so that a model or captions file written atomically is as readable as any other."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def add_model_arguments(parser) -> None:
    """The flags that choose and load a captioner, shared by the command-line tools (caption_images.py, app.py)."""
    parser.add_argument(
        "--model",
        required=True,
        help="A training run's output_dir (LoRA adapter or full model), a merged model folder, or a Hub model id.",
    )
    parser.add_argument(
        "--base_model",
        help="Base model of a LoRA adapter (default: base_model_name_or_path of its adapter_config.json).",
    )
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: auto, cuda when available).")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="Weights dtype (default: auto, the checkpoint's)."
    )


def setup_cli_logging(program: str) -> None:
    """Logging for the command-line tools: their own messages and this package's at INFO, libraries at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in (program, "captioning"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
