"""The model card (README.md) of a run: what was trained, on what, how, and how well, from the run's own files.

``build_card_context`` gathers the facts (arguments, split sizes, result files, hardware, versions);
``write_model_card`` renders ``model_card_template.md`` with Hub metadata (``model-index`` holds the scores).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from captioning.arguments import GENERATION_FLAGS
from captioning.families import ModelFamily, family_by_name
from captioning.modeling import adapter_base_model
from captioning.outputs import CAPTIONING_CONFIG, write_json, write_text_atomic
from captioning.pipeline_usage import PIPELINE_TASK, pipeline_prompt, pipeline_snippet
from captioning.redaction import mask_tokens
from captioning.stages import STAGE1_DIR, stage_arguments

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_card_template.md"
README = "README.md"
# The facts the card was rendered from, kept local (never pushed) so that a push can render the card again for the
# repository it goes to, without local paths: see publication_context and captioning/hub.py.
CARD_CONTEXT = "card_context.json"
TRAINING_CURVES = "training_curves.png"
SAMPLES = "samples.png"

# Caption metrics in the order the card shows them: result-file key (without eval_/test_) -> COCO name.
METRIC_NAMES = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr-D",
    "loss": "Loss",
}
_VERSIONED_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "huggingface_hub", "pycocoevalcap")
_HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class MetricRow:
    """One line of the results table: the score before fine-tuning, after (validation) and on the test split."""

    key: str
    name: str
    baseline: float | None = None
    validation: float | None = None
    test: float | None = None

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.validation is None:
            return None
        return self.validation - self.baseline


@dataclass
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]  # short names (``query``, ``q_proj``), in first-seen order
    num_layers: int | None  # adapted Linear layers, when the full names are known
    vision: bool


@dataclass
class DatasetInfo:
    kind: str  # "hub", "local folder" or "local files"
    name: str  # hub id, folder name, or file names
    config: str | None = None
    layout: str | None = None

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None

    @property
    def label(self) -> str:
        """How the model-index names the data: the Hub id, or ``name (kind)``, or the kind alone when the card
        is published without local names."""
        if self.hub_id:
            return self.name
        return f"{self.name} ({self.kind})" if self.name else self.kind


@dataclass
class Hyperparameters:
    learning_rate: float
    epochs: float
    max_steps: int | None
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    num_devices: int
    total_train_batch_size: int
    optimizer: str
    lr_scheduler: str
    warmup: str
    weight_decay: float
    max_grad_norm: float
    precision: str
    activation_checkpointing: bool
    seed: int
    label_smoothing: float
    max_caption_length: int
    metric_for_best_model: str | None
    image_augmentation: str = "none"


@dataclass
class TrainingRun:
    """What trainer_state.json and train_results.json tell about the run."""

    runtime_seconds: float | None = None
    samples_per_second: float | None = None
    global_step: int | None = None
    epochs: float | None = None
    best_metric: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None

    @property
    def runtime(self) -> str | None:
        return None if self.runtime_seconds is None else format_duration(self.runtime_seconds)


@dataclass
class CardContext:
    """Everything the template shows. Built by :func:`build_card_context`; fields may be edited before writing."""

    model_name: str  # title
    model_id: str  # what the usage snippet loads: the Hub id, or the output folder
    hub_model_id: str | None
    base_model: str
    base_model_on_hub: bool
    family: str
    family_label: str
    model_class: str
    usage_input_ids: str  # the family's snippet lines that build `input_ids` and `skip` (captioning/families/)
    adapter: bool
    lora: LoraSettings | None
    quantization: str  # "none", "8-bit" or "4-bit NF4"
    caption_prompt: str
    generation: dict[str, Any]
    dataset: DatasetInfo
    splits: dict[str, tuple[int, int]]  # split -> (images, captions)
    hyperparameters: Hyperparameters
    training: TrainingRun
    hardware: str
    versions: dict[str, str]
    metrics: list[MetricRow]
    usage_generate_kwargs: str = ""  # more keyword arguments of the snippet's generate call (the family's)
    eval_results: dict[str, float] = field(default_factory=dict)  # eval_results.json
    test_results: dict[str, float] = field(default_factory=dict)  # predict_results.json
    baseline_results: dict[str, float] = field(default_factory=dict)  # baseline_results.json
    examples: list[dict] = field(default_factory=list)  # first lines of predictions.jsonl
    license: str | None = None
    language: str | list[str] | None = None
    # Absolute local folders of the training data; never rendered: a push removes them from the files it uploads.
    data_paths: list[str] = field(default_factory=list)
    # Set only in a card rendered for a push (publication_context): the dataset-derived files that go with it, name
    # -> what it holds, and when there are none, why.
    shared_data_files: dict[str, str] | None = None
    shared_data_note: str | None = None
    # The training objective: {"name": "xe"}, or SCST's settings (captioning/scst.py) and the run it continued from.
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "xe"})

    @property
    def has_baseline(self) -> bool:
        return any(row.baseline is not None for row in self.metrics)

    @property
    def has_validation(self) -> bool:
        return any(row.validation is not None for row in self.metrics)

    @property
    def has_test(self) -> bool:
        return any(row.test is not None for row in self.metrics)

    @property
    def base_model_shown(self) -> str:
        """The base model as the card's text names it (an absolute local path by its folder name only)."""
        return self.base_model if self.base_model_on_hub else _shown_path(self.base_model)

    @property
    def snippet_prompt(self) -> str:
        """The prompt as training tokenized it: OPT's byte-level BPE gets it without the trailing space."""
        return pipeline_prompt(family_by_name(self.family), self.caption_prompt)

    @property
    def pipeline_snippet(self) -> str:
        """The usage section's first snippet: three lines that load this model with the transformers pipeline and
        caption an image with the prompt and generation settings of training."""
        return pipeline_snippet(
            self.model_id, family_by_name(self.family), self.caption_prompt, self.generation, python_literal
        )


# --------------------------------------------------------------------------------------------------------------
# Building the context
# --------------------------------------------------------------------------------------------------------------


def build_card_context(
    model_args,
    data_args,
    lora_args,
    caption_args,
    training_args,
    *,
    family: ModelFamily,
    label_smoothing: float,
    split_sizes: Mapping[str, tuple[int, int]] | None = None,
    lora_target_modules: Sequence[str] | None = None,
    hub_model_id: str | None = None,
    output_dir: str | Path | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    hardware: str | None = None,
) -> CardContext:
    """Collect what the card shows from the five argument dataclasses and the files in ``output_dir``.

    ``label_smoothing`` is the factor the loss used: pass it explicitly, because ``run_captioning.py`` moves
    ``--label_smoothing_factor`` into BLIP's loss and sets the training argument to 0. ``split_sizes`` maps a split
    to (images, captions), see :func:`count_split_sizes`; ``lora_target_modules`` are the adapted module names
    (default: ``adapter_config.json``'s). ``hub_model_id`` defaults to ``--hub_model_id``; ``output_dir`` to
    ``--output_dir``. Reads ``eval_results.json``, ``predict_results.json``, ``baseline_results.json``,
    ``train_results.json``, ``trainer_state.json``, ``captioning_config.json`` and ``predictions.jsonl`` when they
    exist.
    """
    output_dir = Path(output_dir or training_args.output_dir)
    files = _read_run_files(output_dir)
    captioning_config = files["captioning_config"]
    hub_model_id = hub_model_id or getattr(training_args, "hub_model_id", None)
    # The run's base weights: an adapter it continued from (e.g. SCST's stage 1) is not a base, its base is.
    base_model = (
        (adapter_base_model(model_args.model_name_or_path) if model_args.model_name_or_path else None)
        or model_args.model_name_or_path
        or captioning_config.get("base_model", "")
    )
    adapter = bool(lora_args.use_lora)

    return CardContext(
        model_name=(hub_model_id or output_dir.resolve().name).rsplit("/", 1)[-1],
        model_id=hub_model_id or str(output_dir),
        hub_model_id=hub_model_id,
        base_model=base_model,
        base_model_on_hub=is_hub_id(base_model),
        family=family.name,
        family_label=family.label,
        model_class=family.model_class.__name__,
        usage_input_ids=family.snippet,
        usage_generate_kwargs=family.snippet_generate_kwargs,
        adapter=adapter,
        lora=_lora_settings(lora_args, lora_target_modules, files["adapter_config"]) if adapter else None,
        quantization="8-bit" if lora_args.load_in_8bit else "4-bit NF4" if lora_args.load_in_4bit else "none",
        caption_prompt=family.prompt(data_args.caption_prompt),
        generation=_ordered_generation(
            captioning_config.get("generation") or _generation_from_args(caption_args, family)
        ),
        dataset=_dataset_info(data_args),
        splits=_split_sizes(split_sizes, files),
        hyperparameters=_hyperparameters(training_args, model_args, data_args, label_smoothing),
        training=_training_run(files),
        hardware=hardware or describe_hardware(training_args),
        versions=framework_versions(quantized=lora_args.load_in_8bit or lora_args.load_in_4bit),
        metrics=_metric_rows(files["baseline"], files["eval"], files["predict"]),
        eval_results=files["eval"],
        test_results=files["predict"],
        baseline_results=files["baseline"],
        examples=files["predictions"],
        license=license,
        language=language,
        data_paths=_local_data_paths(data_args),
        objective=_objective(caption_args, model_args, training_args, files["stage1_eval"]),
    )


def _objective(caption_args, model_args, training_args, stage1_eval: Mapping[str, Any]) -> dict[str, Any]:
    """What the card says about the objective; a stage 1 run in a local folder is not named (no local paths). With
    --scst_epochs both stages ran here: their epochs, learning rates and validation CIDEr-D."""
    scst_epochs = getattr(caption_args, "scst_epochs", 0)
    if getattr(caption_args, "training_objective", "xe") != "scst" and not scst_epochs:
        return {"name": "xe"}
    source = model_args.model_name_or_path
    objective = {
        "name": "scst",
        "samples": caption_args.scst_samples,
        "baseline": caption_args.scst_baseline,
        "temperature": caption_args.scst_temperature,
        "continued_from": source if is_hub_id(source) and not scst_epochs else None,
        "both_stages": None,
    }
    if scst_epochs:
        stage2 = stage_arguments(training_args, caption_args, 2, None)
        objective["both_stages"] = {
            "stage1_epochs": training_args.num_train_epochs,
            "stage1_learning_rate": training_args.learning_rate,
            "stage1_eval_cider": stage1_eval.get("eval_cider"),
            "epochs": stage2.num_train_epochs,
            "learning_rate": stage2.learning_rate,
        }
    return objective


def publication_context(
    context: CardContext,
    *,
    repo_id: str,
    base_model_id: str | None,
    shared_data_files: Mapping[str, str],
    shared_data_note: str | None = None,
) -> CardContext:
    """The card of a push to ``repo_id``: the usage snippet loads ``repo_id`` on ``base_model_id`` (the Hub id of a
    base trained from a local folder), a local dataset goes unnamed, and the test examples and sample gallery are
    shown only when ``shared_data_files`` holds predictions.jsonl / samples.png. ``shared_data_note`` says why no
    dataset-derived file is pushed when there is none."""
    dataset = context.dataset if context.dataset.hub_id else dataclasses.replace(context.dataset, name="")
    base_model = base_model_id or context.base_model
    return dataclasses.replace(
        context,
        model_name=repo_id.rsplit("/", 1)[-1],
        model_id=repo_id,
        hub_model_id=repo_id,
        base_model=base_model,
        base_model_on_hub=base_model_id is not None or is_hub_id(base_model),
        dataset=dataset,
        examples=context.examples if "predictions.jsonl" in shared_data_files else [],
        shared_data_files=dict(shared_data_files),
        shared_data_note=None if shared_data_files else shared_data_note,
    )


def save_card_context(output_dir: str | Path, context: CardContext) -> Path:
    """Keep ``context`` as ``output_dir/card_context.json`` (local only), for :func:`load_card_context`."""
    path = Path(output_dir) / CARD_CONTEXT
    write_json(path, dataclasses.asdict(context))
    return path


def load_card_context(output_dir: str | Path) -> CardContext | None:
    """The context the card of ``output_dir`` was rendered from, or None when there is none (or it cannot be read:
    a run of an older version, a hand-made folder)."""
    path = Path(output_dir) / CARD_CONTEXT
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CardContext(
            **{
                **data,
                "lora": LoraSettings(**data["lora"]) if data["lora"] else None,
                "dataset": DatasetInfo(**data["dataset"]),
                "splits": {name: tuple(sizes) for name, sizes in data["splits"].items()},
                "hyperparameters": Hyperparameters(**data["hyperparameters"]),
                "training": TrainingRun(**data["training"]),
                "metrics": [MetricRow(**row) for row in data["metrics"]],
            }
        )
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("Model card: could not read %s (%s); the card is pushed as written.", path, error)
        return None


def count_split_sizes(splits: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(images, captions) per split of ``load_caption_splits``' result (per-image rows with ``references``);
    streamed splits (no length) are left out."""
    return {
        name: (len(split), sum(len(refs) for refs in split["references"]))
        for name, split in splits.items()
        if isinstance(split, datasets.Dataset)
    }


def adapted_module_names(model: torch.nn.Module) -> list[str] | None:
    """Full names of the layers that carry LoRA adapters (None when there are none): what to pass as
    ``lora_target_modules`` (``adapter_config.json`` may keep only name suffixes, which lose the layer count)."""
    from peft.tuners.lora import LoraLayer

    names = [
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    return names or None


def is_hub_id(name: str) -> bool:
    """True for ``owner/name``-shaped ids that are not an existing local path."""
    return bool(name) and not Path(name).expanduser().exists() and _HUB_ID_PATTERN.fullmatch(name) is not None


def describe_hardware(training_args=None) -> str:
    """``"1 x NVIDIA H200"``, ``"4 x NVIDIA A100-SXM4-80GB"`` (devices the run used), ``"Apple silicon GPU (MPS)"``
    or ``"CPU (16 cores): <model name>"``."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if training_args is not None:
            world_size = getattr(training_args, "world_size", 1) or 1
            count = world_size if world_size > 1 else max(getattr(training_args, "n_gpu", 1) or 1, 1)
        return f"{count} x {torch.cuda.get_device_name(0)}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple silicon GPU (MPS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = _cpu_model()
    return f"CPU ({cores} cores)" + (f": {model}" if model else "")


def framework_versions(quantized: bool = False) -> dict[str, str]:
    """Python and the versions of the libraries the run used (bitsandbytes only for 8/4-bit runs)."""
    versions = {"python": platform.python_version()}
    for package in (*_VERSIONED_PACKAGES, *(("bitsandbytes",) if quantized else ())):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def format_duration(seconds: float) -> str:
    """``54 s``, ``17 min 47 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _read_run_files(output_dir: Path) -> dict[str, Any]:
    def read(name: str) -> dict:
        path = output_dir / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("Model card: could not read %s (%s); leaving it out.", path, error)
            return {}

    examples = []
    predictions = output_dir / "predictions.jsonl"
    if predictions.is_file():
        for line in predictions.read_text(encoding="utf-8").splitlines()[:5]:
            if line.strip():
                examples.append(json.loads(line))
    return {
        "eval": read("eval_results.json"),
        "predict": read("predict_results.json"),
        "baseline": read("baseline_results.json"),
        "stage1_eval": read(f"{STAGE1_DIR}/eval_results.json"),  # --scst_epochs: the cross-entropy stage's model
        "train": read("train_results.json"),
        "state": read("trainer_state.json"),
        "captioning_config": read(CAPTIONING_CONFIG),
        "adapter_config": read("adapter_config.json"),
        "predictions": examples,
    }


def _metric_rows(baseline: Mapping, evaluation: Mapping, test: Mapping) -> list[MetricRow]:
    rows = []
    for key, name in METRIC_NAMES.items():
        row = MetricRow(
            key=key,
            name=name,
            baseline=_number(baseline.get(f"eval_{key}")),
            validation=_number(evaluation.get(f"eval_{key}")),
            test=_number(test.get(f"test_{key}")),
        )
        if row.baseline is not None or row.validation is not None or row.test is not None:
            rows.append(row)
    return rows


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _lora_settings(lora_args, target_modules: Sequence[str] | None, adapter_config: Mapping) -> LoraSettings:
    names = list(target_modules or adapter_config.get("target_modules") or lora_args.lora_target_modules or [])
    short = []
    for name in names:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in short:
            short.append(suffix)
    full_names = target_modules is not None and any("." in name for name in target_modules)
    return LoraSettings(
        r=lora_args.lora_r,
        alpha=lora_args.lora_alpha,
        dropout=lora_args.lora_dropout,
        target_modules=short,
        num_layers=len(target_modules) if full_names else None,
        vision=lora_args.lora_vision,
    )


def _dataset_info(data_args) -> DatasetInfo:
    if data_args.dataset_name:
        return DatasetInfo(kind="hub", name=data_args.dataset_name, config=data_args.dataset_config_name)
    if data_args.dataset_dir:
        layout = None if data_args.dataset_layout == "auto" else data_args.dataset_layout
        return DatasetInfo(kind="local folder", name=_shown_path(data_args.dataset_dir), layout=layout)
    files = [getattr(data_args, name) for name in ("train_file", "validation_file", "test_file")]
    return DatasetInfo(kind="local files", name=", ".join(_shown_path(file) for file in files if file))


def _local_data_paths(data_args) -> list[str]:
    """The folders the data came from (absolute): --dataset_dir, --image_dir and those of the data files."""
    folders = [getattr(data_args, name, None) for name in ("dataset_dir", "image_dir")]
    for name in ("train_file", "validation_file", "test_file"):
        file = getattr(data_args, name, None)
        if file and "://" not in file:
            folders.append(os.path.dirname(file) or ".")
    return sorted({os.path.abspath(os.path.expanduser(folder)) for folder in folders if folder})


def _shown_path(path: str) -> str:
    """A local path as the card shows it: relative paths as given, absolute ones by their last component only
    (a home folder or user name has no place on a public page)."""
    return Path(path).name if Path(path).expanduser().is_absolute() else str(path)


def _split_sizes(given: Mapping[str, tuple[int, int]] | None, files: Mapping) -> dict[str, tuple[int, int]]:
    if given:
        return {name: (int(images), int(captions)) for name, (images, captions) in given.items()}
    # Without counts from the script, fall back on what the result files recorded (captions unknown there
    # except for training, where train_samples counts (image, caption) pairs).
    sizes = {}
    train = files["train"]
    if "train_images" in train:
        sizes["train"] = (int(train["train_images"]), int(train.get("train_samples", 0)))
    for split, data, key in (("validation", files["eval"], "eval_samples"), ("test", files["predict"], "test_samples")):
        if key in data:
            sizes[split] = (int(data[key]), 0)
    return sizes


def _ordered_generation(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The usual knobs first (captioning_config.json stores them sorted by name)."""
    order = [name for name in GENERATION_FLAGS if name in kwargs]
    return {name: kwargs[name] for name in [*order, *sorted(set(kwargs) - set(order))]}


def _generation_from_args(caption_args, family: ModelFamily) -> dict:
    from captioning.trainer import build_generation_kwargs

    return build_generation_kwargs(caption_args, family)


def _hyperparameters(training_args, model_args, data_args, label_smoothing: float) -> Hyperparameters:
    world_size = max(int(getattr(training_args, "world_size", 1) or 1), 1)
    num_devices = world_size if world_size > 1 else max(int(getattr(training_args, "n_gpu", 0) or 0), 1)
    warmup = float(getattr(training_args, "warmup_steps", 0) or 0)
    warmup_ratio = float(getattr(training_args, "warmup_ratio", 0) or 0)
    if 0 < warmup < 1:
        warmup_text = f"{warmup:g} of the steps"
    elif warmup >= 1:
        warmup_text = f"{int(warmup)} steps"
    elif warmup_ratio:
        warmup_text = f"{warmup_ratio:g} of the steps"
    else:
        warmup_text = "none"
    precision = "bf16 mixed precision" if training_args.bf16 else "fp16 mixed precision" if training_args.fp16 else ""
    dtype = getattr(model_args, "dtype", "float32")
    if not precision:
        precision = "fp32" if dtype == "float32" else dtype
    elif dtype != "float32":
        precision += f", weights loaded in {dtype}"
    max_steps = getattr(training_args, "max_steps", -1)
    return Hyperparameters(
        learning_rate=training_args.learning_rate,
        epochs=training_args.num_train_epochs,
        max_steps=max_steps if max_steps and max_steps > 0 else None,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        num_devices=num_devices,
        total_train_batch_size=training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * num_devices,
        optimizer=_enum_value(training_args.optim),
        lr_scheduler=_enum_value(training_args.lr_scheduler_type),
        warmup=warmup_text,
        weight_decay=training_args.weight_decay,
        max_grad_norm=training_args.max_grad_norm,
        precision=precision,
        activation_checkpointing=bool(
            getattr(training_args, "activation_checkpointing", False)
            or getattr(training_args, "gradient_checkpointing", False)
        ),
        seed=training_args.seed,
        label_smoothing=float(label_smoothing),
        max_caption_length=data_args.max_caption_length,
        image_augmentation=getattr(data_args, "image_augmentation", "none"),
        metric_for_best_model=training_args.metric_for_best_model if training_args.load_best_model_at_end else None,
    )


def _enum_value(value) -> str:
    return str(getattr(value, "value", value))


def _training_run(files: Mapping) -> TrainingRun:
    train, state = files["train"], files["state"]
    history = state.get("log_history") or []
    losses = [entry["loss"] for entry in history if _number(entry.get("loss")) is not None]
    return TrainingRun(
        runtime_seconds=_number(train.get("train_runtime")),
        samples_per_second=_number(train.get("train_samples_per_second")),
        global_step=state.get("global_step"),
        epochs=_number(state.get("epoch", train.get("epoch"))),
        best_metric=_number(state.get("best_metric")),
        best_step=state.get("best_global_step"),
        final_train_loss=losses[-1] if losses else None,
    )


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or None


# --------------------------------------------------------------------------------------------------------------
# Writing the card
# --------------------------------------------------------------------------------------------------------------


def build_card_data(context: CardContext) -> ModelCardData:
    """The YAML front matter: Hub metadata and a ``model-index`` equal to the run's result files."""
    family_tag = context.family_label.split(" (")[0].lower()  # "blip", "blip-2", "paligemma", ...
    tags = ["image-captioning", family_tag, "vision"]
    if context.adapter:
        tags += ["lora", "peft"]
    if context.quantization != "none":
        tags += ["bitsandbytes", context.quantization.split()[0]]
    if context.base_model_on_hub:
        relation = "adapter" if context.adapter else "finetune"
        tags.append(f"base_model:{relation}:{context.base_model}")
    eval_results = _eval_results(context, "validation", context.eval_results, "eval_")
    eval_results += _eval_results(context, "test", context.test_results, "test_")
    return ModelCardData(
        base_model=context.base_model if context.base_model_on_hub else None,
        library_name="peft" if context.adapter else "transformers",
        pipeline_tag=PIPELINE_TASK,
        tags=tags,
        datasets=[context.dataset.hub_id] if context.dataset.hub_id else None,
        license=context.license,
        language=context.language,
        model_name=context.model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def _eval_results(context: CardContext, split: str, results: Mapping, prefix: str) -> list[EvalResult]:
    dataset = context.dataset
    entries = []
    for key, name in METRIC_NAMES.items():
        value = _number(results.get(prefix + key))
        if value is None:
            continue
        entries.append(
            EvalResult(
                task_type=PIPELINE_TASK,
                task_name="Image captioning",
                dataset_type=dataset.hub_id or "local",
                dataset_name=dataset.label,
                dataset_config=dataset.config,
                dataset_split=split,
                metric_type=key,
                metric_name=name if key != "loss" else "Loss (teacher-forced cross-entropy)",
                metric_value=results[prefix + key],
            )
        )
    return entries


def render_model_card(context: CardContext, output_dir: str | Path | None = None) -> str:
    """The card's text. Images are linked only when ``training_curves.png`` / ``samples.png`` exist in
    ``output_dir`` (and, in a card for a push, samples.png only when it is pushed). Anything shaped like a Hub token
    is replaced by ``[REDACTED]``."""
    folder = Path(output_dir) if output_dir is not None else None
    shared = context.shared_data_files
    card = ModelCard.from_template(
        build_card_data(context),
        template_path=str(TEMPLATE_PATH),
        card=context,
        training_curves=TRAINING_CURVES if folder is not None and (folder / TRAINING_CURVES).is_file() else None,
        samples_image=SAMPLES
        if folder is not None and (folder / SAMPLES).is_file() and (shared is None or SAMPLES in shared)
        else None,
        fmt=format_metric,
        signed=format_delta,
        number=format_number,
        md=escape_markdown_cell,
        py=python_literal,
    )
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return redact_tokens(text)


def write_model_card(output_dir: str | Path, context: CardContext) -> Path:
    """Render the card into ``output_dir/README.md`` (atomically) and return its path. The context is kept next to
    it (card_context.json, never pushed) so that a push can render the card again for its repository."""
    path = Path(output_dir) / README
    write_text_atomic(path, render_model_card(context, output_dir))
    save_card_context(output_dir, context)
    logger.info("Model card written to %s", path)
    return path


def redact_tokens(text: str) -> str:
    """``text`` with every token-shaped string (captioning.redaction.TOKEN_PATTERN) replaced by ``[REDACTED]``."""
    redacted, count = mask_tokens(text, "[REDACTED]")
    if count:
        logger.warning("Model card: replaced %d token-shaped string(s) with [REDACTED].", count)
    return redacted


def format_metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def format_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def format_number(value: float | int | None) -> str:
    """``0.002``, ``5e-05``, ``32``, ``6``: short, exact enough for hyper-parameters."""
    if value is None:
        return "–"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}"


def python_literal(value: Any) -> str:
    """A Python literal for the usage snippet: double-quoted strings, dicts of numbers and strings."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{python_literal(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(python_literal(item) for item in value) + "]"
    return repr(value)


def escape_markdown_cell(text: Any) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")
