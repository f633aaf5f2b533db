"""Loading the captioner: processor, quantization, LoRA targets and adapters, or full fine-tuning."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoProcessor, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from captioning.arguments import LoraArguments, ModelArguments, split_comma_list
from captioning.families import ModelFamily, check_config_json
from captioning.outputs import CAPTIONING_CONFIG

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
# Output heads stay out of "all-linear": adapting the vocabulary projection is rarely wanted (PEFT excludes it too).
_HEAD_NAMES = ("lm_head", "cls.predictions.decoder")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def adapter_base_model(path: str) -> str | None:
    """The base model a local LoRA adapter folder (a finished run's output_dir) was trained on, or None."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"--model_name_or_path {path}: adapter_config.json does not name its base model.")
    return base


def base_model_path(model_args: ModelArguments) -> str:
    """Where the base weights and config come from: the checkpoint itself, or an adapter's base."""
    return adapter_base_model(model_args.model_name_or_path) or model_args.model_name_or_path


def load_config(model_args: ModelArguments):
    """The checkpoint's config; its config.json is first shown to the families as JSON (a checkpoint that needs
    remote code gets an error naming the native one, not AutoConfig's list of model types)."""
    path = base_model_path(model_args)
    check_config_json(read_config_json(path, model_args) or {}, path)
    return AutoConfig.from_pretrained(
        path,
        revision=model_args.revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )


def read_config_json(path: str, model_args: ModelArguments) -> dict | None:
    """config.json of a local folder or a Hub checkpoint (cached or downloadable) as a dict; None when it cannot be
    read (AutoConfig then says why)."""
    try:
        found = (
            Path(path) / "config.json"
            if Path(path).is_dir()
            else cached_file(
                path,
                "config.json",
                revision=model_args.revision,
                cache_dir=model_args.cache_dir,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                _raise_exceptions_for_gated_repo=False,
            )
        )
        return json.loads(Path(found).read_text(encoding="utf-8")) if found else None
    except (OSError, ValueError):  # no such file, not a valid repo id, not JSON
        return None


def check_adapter_args(model_args: ModelArguments, lora_args: LoraArguments) -> None:
    if adapter_base_model(model_args.model_name_or_path) and not lora_args.use_lora:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} is a LoRA adapter; --use_lora false would "
            "fine-tune its base without it. Merge it first (python merge_adapter.py) or keep LoRA on."
        )


def processor_source(model_args: ModelArguments) -> str:
    """Where the processor loads from: --processor_name_or_path, else the checkpoint (an adapter folder without a
    processor: its base model's)."""
    source = model_args.processor_name_or_path or model_args.model_name_or_path
    if model_args.processor_name_or_path is None and adapter_base_model(source):
        has_processor = any((Path(source) / name).is_file() for name in _PROCESSOR_FILES)
        source = source if has_processor else base_model_path(model_args)
    return source


def saved_by_a_run(model_args: ModelArguments) -> bool:
    """Whether the processor is the one a run of this tool saved (its output_dir has captioning_config.json)."""
    return (Path(processor_source(model_args)) / CAPTIONING_CONFIG).is_file()


def load_processor(model_args: ModelArguments):
    """The checkpoint's processor (image processor + tokenizer); the torchvision-backed one when available."""
    return AutoProcessor.from_pretrained(
        processor_source(model_args),
        revision=model_args.revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
    )


def build_quantization_config(lora_args: LoraArguments) -> BitsAndBytesConfig | None:
    """``--load_in_8bit`` / ``--load_in_4bit`` as a bitsandbytes config (NF4 with double quantization for 4-bit)."""
    if lora_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if lora_args.load_in_4bit:
        compute_dtype = (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


def build_lora_config(lora_args: LoraArguments, target_modules: list[str]) -> LoraConfig:
    """No ``task_type``: PEFT's task wrappers change the forward signature and break BLIP."""
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target_modules,
        bias="none",
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of every Linear layer (bitsandbytes' 8/4-bit layers subclass ``nn.Linear``)."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_lora_targets(model: torch.nn.Module, family: ModelFamily, lora_args: LoraArguments) -> list[str]:
    """Full module names that get LoRA adapters.

    Requested names match a Linear layer by its full name or name suffix (``query`` matches
    ``...attention.self.query``). Without ``--lora_vision`` the vision tower is left out; a requested name that
    matches nothing is an error listing the model's Linear layer names.
    """
    requested = split_comma_list(lora_args.lora_target_modules) or list(family.lora_target_modules)
    linear = [name for name in linear_module_names(model) if not name.endswith(_HEAD_NAMES)]
    candidates = [name for name in linear if not name.startswith(family.vision_prefix)]
    if lora_args.lora_target_modules is None:  # family defaults live on the language side only
        candidates = [name for name in candidates if name.startswith(family.language_prefix)]

    if requested == [ALL_LINEAR]:
        targets = candidates
    else:
        targets = []
        for wanted in requested:
            matched = [name for name in candidates if name == wanted or name.endswith("." + wanted)]
            if not matched:
                raise ValueError(
                    f"--lora_target_modules: {wanted!r} matches no Linear layer outside the vision tower of this "
                    f"{family.name} model (--lora_vision adds the vision tower's attention). "
                    f"Its Linear layers are named: {', '.join(_short_names(model))}. Use those names, full module "
                    f"names, or {ALL_LINEAR}."
                )
            targets += [name for name in matched if name not in targets]
    if lora_args.lora_vision:
        vision = [
            name
            for name in linear
            if name.startswith(family.vision_prefix) and name.endswith(family.vision_lora_target_modules)
        ]
        targets += [name for name in vision if name not in targets]
    return targets


def _short_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    config: PretrainedConfig,
    family: ModelFamily,
) -> PreTrainedModel | PeftModel:
    """Load the checkpoint in the family's class; quantize, add LoRA adapters or set up full fine-tuning."""
    quantization_config = build_quantization_config(lora_args)
    # One copy per process: device_map="auto" would shard a quantized model across GPUs, which DDP cannot train.
    device_map = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
    adapter = adapter_base_model(model_args.model_name_or_path) is not None
    model = family.model_class.from_pretrained(
        base_model_path(model_args),
        config=config,
        revision=model_args.revision,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
        dtype=_dtype(model_args.dtype),
        quantization_config=quantization_config,
        device_map=device_map if quantization_config is not None else None,
    )
    if quantization_config is not None and lora_args.load_in_4bit:
        keep_4bit_weights_trainable_on_cpu(model)
    if quantization_config is not None:
        # Freezes the base and upcasts norms to fp32. Activation checkpointing is left to the Trainer, which enables
        # it non-reentrant: no input-embedding grad hook (that hook breaks BLIP's in-place embedding sum).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter:
        # A finished run's adapter: evaluate it, or keep training it with its own LoRA settings.
        with warnings.catch_warnings():
            # peft reads the deprecated `is_gradient_checkpointing` alias; nothing for users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, model_args.model_name_or_path, is_trainable=True)
        logger.info(
            "Loaded the LoRA adapter in %s on top of %s", model_args.model_name_or_path, base_model_path(model_args)
        )
    elif lora_args.use_lora:
        targets = resolve_lora_targets(model, family, lora_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, build_lora_config(lora_args, targets))
        logger.info("LoRA on %d layers: %s", len(targets), summarize_targets(targets))
    elif lora_args.freeze_vision_tower:
        for name, parameter in model.named_parameters():
            if name.startswith(family.vision_prefix):
                parameter.requires_grad_(False)
    trainable, total = count_parameters(model)
    logger.info(
        "Parameters: %s trainable of %s total (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1)
    )
    return model


def vision_tower_frozen(model: torch.nn.Module, family: ModelFamily) -> bool:
    """True when no parameter of the vision tower is trained (LoRA without --lora_vision, --freeze_vision_tower)."""
    marker = "." + family.vision_prefix
    return not any(
        parameter.requires_grad
        for name, parameter in model.named_parameters()
        if name.startswith(family.vision_prefix) or marker in name
    )


def image_side_modules(model: torch.nn.Module, family: ModelFamily) -> list[torch.nn.Module]:
    """The modules of the image side: every child of the model, or of the child that holds the language model
    (``model.`` of ``model.language_model.``), other than the language model and the output layer (BLIP-2: the vision
    tower, the Q-Former and the projection; PaliGemma: the vision tower and the projector)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules, prefix = [], ""
    parent = base
    while True:
        descend = None
        for name, child in parent.named_children():
            path = prefix + name + "."
            if path == family.language_prefix or name == "lm_head":
                continue
            if family.language_prefix.startswith(path):
                descend = (child, path)
            else:
                modules.append(child)
        if descend is None:
            return modules
        parent, prefix = descend


def frozen_image_side(model: torch.nn.Module, family: ModelFamily) -> list[torch.nn.Module]:
    """The image-side modules with no trainable parameter. Training keeps them in eval mode: a frozen feature
    extractor gives each image the same features in every step (no dropout or drop-path noise), as LAVIS runs its
    frozen ViT, and as the feature cache computes them once."""
    return [
        module
        for module in image_side_modules(model, family)
        if not any(parameter.requires_grad for parameter in module.parameters())
    ]


def image_feature_module(model: torch.nn.Module, family: ModelFamily) -> torch.nn.Module:
    """The module whose output is shared by all captions of an image (see captioning/grouping.py)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_submodule(family.image_feature_module)


def keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit CPU weights for fast inference the first time a layer runs without grad (an
    evaluation); the repacked path has no backward, so training after an evaluation fails or, for layers without a
    bias, gets wrong gradients. Turn the repacking off (it only exists on CPU)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the values they hold."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def summarize_targets(targets: list[str]) -> str:
    """``text_decoder.bert.encoder.layer.{0,1}.attention.self.{query,value}``-style summary of module names."""
    patterns: dict[str, int] = {}
    for name in targets:
        pattern = re.sub(r"\.\d+\.", ".N.", name)
        patterns[pattern] = patterns.get(pattern, 0) + 1
    return ", ".join(f"{pattern} (x{count})" if count > 1 else pattern for pattern, count in patterns.items())


def check_label_smoothing(family: ModelFamily, factor: float) -> None:
    if factor > 0 and family.name != "blip":
        raise ValueError(
            f"--label_smoothing_factor {factor}: supported for BLIP only (BLIP and LAVIS use 0.1); "
            f"{family.name} computes its loss inside the language model. Set it to 0."
        )


def apply_label_smoothing(model: torch.nn.Module, family: ModelFamily, factor: float) -> None:
    """Label smoothing inside BLIP's own loss (the Trainer's smoother would misalign BLIP's unshifted logits)."""
    check_label_smoothing(family, factor)
    if factor <= 0:
        return
    decoder = model.get_base_model().text_decoder if isinstance(model, PeftModel) else model.text_decoder
    decoder.label_smoothing = factor
