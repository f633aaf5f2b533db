#!/usr/bin/env python
"""Fine-tune a captioner (BLIP, BLIP-2, Florence-2, PaliGemma) on your images and captions (LoRA by default),
evaluate it with the COCO caption metrics, and write an adapter or model that loads with transformers/peft.

    accelerate launch run_captioning.py --config configs/blip_base_lora.yaml --dataset_dir data/flickr8k
    python run_captioning.py --help
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

# isort: off
import captioning  # noqa: F401  (first: quiets a warning bitsandbytes logs when transformers imports it)

# isort: on
import datasets
import transformers
from accelerate import PartialState
from transformers import EarlyStoppingCallback, PretrainedConfig, set_seed
from transformers.trainer_utils import IntervalStrategy

from captioning.arguments import Arguments, parse_args, runs_scst, validate_args
from captioning.augmentation import build_augmentation
from captioning.checkpoints import MarkCompleteCheckpoints, resolve_resume_checkpoint
from captioning.cider_reward import CiderD
from captioning.data import CaptionImages, CaptionPairs, load_caption_splits
from captioning.distributed import end_processes, run_on_main
from captioning.families import ModelFamily, check_image_flags, detect_family
from captioning.feature_cache import cache_image_features, feature_cache_off_reason
from captioning.hub import check_push_config, push_output_dir
from captioning.image_cache import ImageCache, build_image_cache
from captioning.model_card import adapted_module_names, build_card_context, count_split_sizes, write_model_card
from captioning.modeling import (
    apply_label_smoothing,
    base_model_path,
    check_adapter_args,
    check_label_smoothing,
    frozen_image_side,
    image_feature_module,
    load_config,
    load_model,
    load_processor,
    saved_by_a_run,
    vision_tower_frozen,
)
from captioning.outputs import write_captioning_config, write_json, write_predictions
from captioning.plots import build_samples, plot_samples, plot_training_curves
from captioning.run_dir import input_paths, start_run
from captioning.scan import DataReport, scan_splits_once
from captioning.scst import SelfCritic
from captioning.stages import joined_log_history, resolve_stage_resume, stage1_log_history, stage_arguments
from captioning.streaming import load_streaming_splits
from captioning.trainer import CaptioningTrainer, build_generation_kwargs
from collators import CaptionCollator, build_layout
from metrics import CaptionScorer

logger = logging.getLogger("run_captioning")
GALLERY_SIZE = 8  # test images shown in samples.png


@dataclass
class RunPlan:
    """What the configuration check settled: the checkpoint's config and family, whether to push at the end, the
    label smoothing asked for (the Trainer's own field is zeroed once BLIP's loss applies it), and the run id that
    this run's checkpoints and output_dir/run.json record."""

    config: PretrainedConfig
    family: ModelFamily
    push_requested: bool
    label_smoothing: float
    run_id: str
    resume_stage: int = 1  # --scst_epochs: the stage --resume_from_checkpoint continues (2: stage 1 is done)


@dataclass
class RunRecord:
    """What the phases produced, for the card, the pictures and the caller."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    test: CaptionImages | None = None
    test_captions: list[str] | None = None
    gallery_baseline: list[str] | None = None  # baseline captions of the first test images (the gallery)
    log_history: list[dict] | None = None  # both stages' logs on one step axis (--scst_epochs)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the job the flags describe; returns the metrics of each phase that ran (also written to output_dir)."""
    args = parse_args(argv)
    setup_logging(args.training)
    plan = check_configuration(args)
    splits = load_data(args)
    trainer, model, second_stage = build_trainer(args, plan, splits)
    try:
        record, trainer = run_phases(trainer, splits, args, plan, second_stage)
    finally:
        trainer.scorer.close()
    if trainer.is_world_process_zero():  # the others need not wait: a push can take longer than any timeout
        publish(args, plan, trainer, record, splits, model)
    end_processes()
    return record.metrics


def publish(args: Arguments, plan: RunPlan, trainer, record: RunRecord, splits, model) -> None:
    """The card and its pictures, then the push when asked (the main process only)."""
    hub_model_id = args.training.hub_model_id if plan.push_requested else None
    write_card_and_pictures(args, plan, trainer, record, splits, model, hub_model_id)
    if plan.push_requested:
        push_output_dir(
            args.training.output_dir,
            hub_model_id,
            private=args.training.hub_private_repo is not False,
            base_model_id=args.training.base_model_id,
            push_samples=args.training.push_samples,
            push_app=args.training.push_app,
            overwrite_foreign_repo=args.training.hub_overwrite_foreign_repo,
        )


def check_configuration(args: Arguments) -> RunPlan:
    """Everything that can be checked before data or weights load; then output_dir is readied for this run (an
    earlier run moved to previous-runs/ with --overwrite_output_dir, run.json written) before anything is written."""
    training = args.training
    validate_args(*args)
    check_push_config(
        training.push_to_hub,
        training.hub_model_id,
        training.hub_token,
        base_model=base_model_path(args.model) if training.push_to_hub else None,
        base_model_id=training.base_model_id,
        private=training.hub_private_repo is not False,
        overwrite_foreign_repo=training.hub_overwrite_foreign_repo,
    )
    push_requested, training.push_to_hub = training.push_to_hub, False  # the Trainer itself never pushes
    resume_stage = 1
    if args.caption.scst_epochs > 0:  # two stages: the checkpoint may be stage 1's, in <output_dir>/stage1_xe
        resume_stage, training.resume_from_checkpoint = resolve_stage_resume(
            training.resume_from_checkpoint, training.output_dir
        )
    else:
        training.resume_from_checkpoint = resolve_resume_checkpoint(
            training.resume_from_checkpoint, training.output_dir
        )
    check_adapter_args(args.model, args.lora)
    config = load_config(args.model)
    family = detect_family(config)
    check_image_flags(family, args.data)
    check_label_smoothing(family, training.label_smoothing_factor)
    if args.data.cache_image_features and (reason := feature_cache_off_reason(args, family)) is not None:
        raise ValueError(f"--cache_image_features true cannot apply: {reason}. Drop the flag.")
    run_id = start_run(training, input_paths(args))
    set_seed(training.seed)
    return RunPlan(config, family, push_requested, training.label_smoothing_factor, run_id, resume_stage)


def load_data(args: Arguments) -> dict:
    """Per-image splits with unusable captions and images left out (counted in data_report.json); with
    --streaming, the training split is a stream of caption rows (its bad images are skipped as they come) and the
    in-memory validation and test images are scanned like any split."""
    report = DataReport()
    train = None
    if args.data.streaming:
        train, splits = load_streaming_splits(args.data, seed=args.training.seed, cache_dir=args.model.cache_dir)
        check_splits({"train": train, **splits} if train is not None else splits, args.training, args.caption)
        args.training.accelerator_config.dispatch_batches = False  # each process reads its own shards
    else:
        splits = load_caption_splits(args.data, cache_dir=args.model.cache_dir, report=report)
        check_splits(splits, args.training, args.caption)
    splits, _ = scan_splits_once(
        splits,
        report=report,
        scan_images=args.data.scan_images,
        num_workers=args.data.preprocessing_num_workers,
        max_bad_fraction=args.data.max_bad_fraction,
        min_image_side=args.data.min_image_side,
        show_progress=args.training.should_log and not args.training.disable_tqdm,
        report_dir=args.training.output_dir if args.training.process_index == 0 else None,
    )
    return splits if train is None else {"train": train, **splits}


def preprocess_images(args: Arguments, splits: dict, image_processor, family: ModelFamily) -> dict[str, ImageCache]:
    """Resized uint8 pixels of the training and validation images, computed once (the main process builds them,
    the others then open them; a failure of the main process stops them all with its message)."""
    if not args.data.preprocess_images or args.data.streaming:
        return {}
    if not family.fixed_image_size:
        logger.info(
            "%s keeps each image at its own size (within --min_pixels / --max_pixels): no preprocessing cache, "
            "images are decoded and resized as batches are built.",
            family.label,
        )
        return {}
    if getattr(image_processor, "do_image_splitting", False):
        logger.info(
            "--image_splitting: %s cuts each image into as many tiles as its aspect ratio needs, which one resized "
            "image per picture cannot hold: no preprocessing cache, images are decoded and cut as batches are built.",
            family.label,
        )
        return {}

    cached = [name for name in ("train", "validation") if name in splits]
    if args.data.image_augmentation != "none" and "train" in cached:
        cached.remove("train")
        logger.info(
            "--image_augmentation %s crops each training image at full resolution: training images are decoded "
            "every epoch (no preprocessing cache for them); validation images are cached.",
            args.data.image_augmentation,
        )

    def build() -> dict[str, ImageCache]:
        return {
            name: build_image_cache(
                splits[name],
                image_processor,
                root=args.data.image_cache_dir,
                num_workers=args.data.preprocessing_num_workers,
                show_progress=args.training.should_log and not args.training.disable_tqdm,
                description=f"{name} images",
            )
            for name in cached
        }

    caches = run_on_main(build, what="Preprocessing the images")
    if not PartialState().is_main_process:
        caches = build()  # reuses the main process's caches (builds its own where --image_cache_dir is not shared)
    return caches


def training_dataset(train, cache: ImageCache | None, images: bool = False, augmentation=None, features=None):
    """Caption rows to train on (a view of the per-image split, or the stream itself); with SCST the images (never
    their cached features: SCST samples from pixels)."""
    if train is None or isinstance(train, datasets.IterableDataset):
        return train
    if images:
        return CaptionImages(train, cache)
    return CaptionPairs(train, cache=cache, augmentation=augmentation, features=features)


def build_self_critic(args: Arguments, splits: dict, layout, collator, processor, model, family):
    """--training_objective scst or --scst_epochs: the reward (CIDEr-D with the training split's document
    frequencies) and the sampling settings (evaluation's max/min new tokens); None for cross-entropy alone."""
    caption = args.caption
    if not runs_scst(caption) or "train" not in splits:
        return None
    generation = build_generation_kwargs(caption, family)
    end_ids = model.generation_config.eos_token_id
    end_ids = [end_ids] if isinstance(end_ids, int) else list(end_ids or [])
    logger.info(
        "Self-critical training: %d samples per image, %s baseline, CIDEr-D rewards against %d training images' "
        "references.",
        caption.scst_samples,
        caption.scst_baseline,
        len(splits["train"]),
    )
    return SelfCritic(
        reward=CiderD(CaptionImages(splits["train"]).references),
        layout=layout,
        tokenizer=processor.tokenizer,
        pad_rows=collator.pad_rows,
        samples=caption.scst_samples,
        temperature=caption.scst_temperature,
        baseline=caption.scst_baseline,
        max_new_tokens=generation["max_new_tokens"],
        min_new_tokens=generation["min_new_tokens"],
        end_ids=tuple({layout.eos_id, *end_ids}),
        bleu_weight=caption.scst_bleu_weight,
    )


def build_trainer(args: Arguments, plan: RunPlan, splits: dict):
    """Processor, model (LoRA / k-bit / full), collator, and the CaptioningTrainer around them; with --scst_epochs
    the trainer is stage 1's (cross-entropy, in <output_dir>/stage1_xe), and the third value builds stage 2's
    (SCST on the same model, in output_dir) once stage 1 is done; else that value is None."""
    training, family = args.training, plan.family
    processor = load_processor(args.model)
    if family.configure_processor is not None:  # --image_splitting, --min_pixels / --max_pixels
        family.configure_processor(processor, args.data, from_run=saved_by_a_run(args.model))
    caption_prompt = family.prompt(args.data.caption_prompt)  # --caption_prompt, else the family's default
    # The processor's options (set above) and the layout come before the preprocessing cache, which follows them.
    layout = build_layout(family, plan.config, processor, caption_prompt)
    caches = preprocess_images(args, splits, processor.image_processor, family)
    model = load_model(args.model, args.lora, plan.config, family)
    apply_label_smoothing(model, family, training.label_smoothing_factor)
    training.label_smoothing_factor = 0.0  # applied inside BLIP's loss, where the logits are aligned
    group_images = (
        training.captions_per_image_in_batch > 1 and layout.image_grouping and vision_tower_frozen(model, family)
    )
    if group_images:
        logger.info(
            "Vision tower frozen: up to %d captions of an image share a batch and one vision pass.",
            training.captions_per_image_in_batch,
        )
    collator = CaptionCollator(
        processor.image_processor, processor.tokenizer, layout, args.data.max_caption_length, group_images
    )
    self_critic = build_self_critic(args, splits, layout, collator, processor, model, family)
    two_stages = args.caption.scst_epochs > 0
    features, feature_feed = cache_image_features(args, splits, caches, collator, model, family, layout)

    def trainer_for(stage_args, critic) -> CaptioningTrainer:
        return CaptioningTrainer(
            model=model,
            args=stage_args,
            train_dataset=training_dataset(
                splits.get("train"),
                caches.get("train"),
                critic is not None,
                build_augmentation(args.data.image_augmentation),
                features.get("train"),
            ),
            eval_dataset=(
                CaptionImages(splits["validation"], caches.get("validation"), features.get("validation"))
                if "validation" in splits
                else None
            ),
            data_collator=collator,
            processing_class=processor,
            layout=layout,
            generation_kwargs=build_generation_kwargs(args.caption, family),
            scorer=scorer,
            image_feature_module=image_feature_module(model, family),
            captions_per_image_in_batch=training.captions_per_image_in_batch if group_images else 1,
            run_id=plan.run_id,
            self_critic=critic,
            feature_feed=feature_feed,
            frozen_image_side=frozen_image_side(model, family),
            callbacks=[MarkCompleteCheckpoints(plan.run_id), *early_stopping(args.caption)],
        )

    scorer = CaptionScorer(use_meteor=args.caption.compute_meteor)
    if two_stages:
        resume = training.resume_from_checkpoint
        first_args = stage_arguments(training, args.caption, 1, resume if plan.resume_stage == 1 else None)
        trainer = trainer_for(first_args, None)

        def second_stage() -> CaptioningTrainer:
            stage_args = stage_arguments(training, args.caption, 2, resume if plan.resume_stage == 2 else None)
            logger.info(
                "Stage 2: self-critical training for %s epochs at learning rate %g, from stage 1's weights.",
                stage_args.num_train_epochs,
                stage_args.learning_rate,
            )
            return trainer_for(stage_args, self_critic)

    else:
        trainer, second_stage = trainer_for(training, self_critic), None
    if trainer.is_world_process_zero():
        for output_dir in {training.output_dir, trainer.args.output_dir}:
            write_captioning_config(
                output_dir,
                family=family.name,
                base_model=base_model_path(args.model),
                caption_prompt=caption_prompt,
                generation_kwargs=trainer.generation_kwargs,
                max_caption_length=args.data.max_caption_length,
            )
    return trainer, model, second_stage


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    replicas_talk = training_args.log_level_replica in ("debug", "info")  # --log_level_replica info
    level = logging.INFO if training_args.should_log or replicas_talk else logging.WARNING
    for name in ("run_captioning", "captioning", "metrics", "collators"):
        logging.getLogger(name).setLevel(level)
    # bitsandbytes logs a warning on every 8-bit matmul whose input is not fp16 (always the case on CPU).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    library_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(
        max(library_level, logging.WARNING) if library_level == logging.INFO else library_level
    )
    transformers.utils.logging.set_verbosity(library_level if library_level != logging.INFO else logging.WARNING)


def check_splits(splits: dict, training_args, caption_args) -> None:
    """Each requested phase needs its split; without a validation split, evaluation during training is off."""
    needs = {
        "train": ("--do_train", training_args.do_train),
        "validation": ("--do_eval", training_args.do_eval_requested),
        "test": ("--do_predict", training_args.do_predict),
    }
    if caption_args.eval_baseline:
        needs["validation"] = ("--eval_baseline", True) if not training_args.do_eval else needs["validation"]
    hints = {
        "train": "--train_file or a source with a train split",
        "validation": "--validation_file, a source with a validation split, or --validation_split_percentage > 0",
        "test": "--test_file, a source with a test split, or --test_split_percentage > 0",
    }
    for split, (flag, wanted) in needs.items():
        if wanted and split not in splits:
            raise ValueError(f"{flag} needs a {split} split: give {hints[split]}.")
    if "validation" not in splits and training_args.eval_strategy != IntervalStrategy.NO:
        logger.warning("No validation split: no evaluation during training, and the last checkpoint is kept.")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False
        training_args.do_eval = False


def early_stopping(caption_args) -> list:
    if caption_args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=caption_args.early_stopping_patience)]


def run_phases(trainer: CaptioningTrainer, splits: dict, args: Arguments, plan: RunPlan, second_stage=None):
    """Baseline, train (with --scst_epochs, stage 1 then stage 2), evaluate, predict: each writes its results file
    in output_dir. Returns the record and the trainer of the final model."""
    caption_args, training_args = args.caption, args.training
    record = RunRecord()
    if caption_args.eval_baseline:
        logger.info("Evaluating the model before fine-tuning (baseline)")
        record.metrics["baseline"] = trainer.evaluate()
        trainer.save_metrics("baseline", record.metrics["baseline"], combined=False)
        if second_stage is not None and trainer.is_world_process_zero():  # stage 1's folder, and the run's
            write_json(Path(training_args.output_dir) / "baseline_results.json", record.metrics["baseline"])
        if training_args.do_predict:  # captions before fine-tuning for the sample gallery
            gallery = CaptionImages(splits["test"].select(range(min(GALLERY_SIZE, len(splits["test"])))))
            record.gallery_baseline = trainer.predict(gallery, metric_key_prefix="gallery").predictions

    if training_args.do_train:
        if second_stage is None:
            record.metrics["train"] = train_stage(trainer, splits)
        else:
            if plan.resume_stage == 1:
                record.metrics["stage1_train"] = train_stage(trainer, splits)
                if training_args.do_eval:  # stage 1's model: what SCST starts from (stage1_xe/eval_results.json)
                    record.metrics["stage1_eval"] = evaluate_and_save(trainer)
            else:
                logger.info("Resuming stage 2 (SCST): stage 1 finished in %s.", trainer.args.output_dir)
            trainer = second_stage()  # the same model, collator and scorer
            record.metrics["train"] = train_stage(trainer, splits)
            record.log_history = joined_log_history(
                stage1_log_history(training_args.output_dir), trainer.state.log_history
            )

    if training_args.do_eval:
        record.metrics["eval"] = evaluate_and_save(trainer)

    if training_args.do_predict:
        record.test = CaptionImages(splits["test"])
        output = trainer.predict(record.test, metric_key_prefix="test")
        record.test_captions = output.predictions
        metrics = dict(output.metrics)
        metrics["test_samples"] = len(record.test)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            write_predictions(
                f"{training_args.output_dir}/predictions.jsonl",
                record.test.image_ids,
                record.test_captions,
                record.test.references,
            )
        record.metrics["predict"] = metrics
    return record, trainer


def train_stage(trainer: CaptioningTrainer, splits: dict) -> dict[str, float]:
    """Train (resuming when its arguments say so), save the model and the train metrics in its output_dir."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    if isinstance(trainer.train_dataset, CaptionPairs):
        metrics["train_images"] = len(splits["train"])
        metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluate_and_save(trainer: CaptioningTrainer) -> dict[str, float]:
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(trainer.eval_dataset)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def write_card_and_pictures(
    args: Arguments, plan: RunPlan, trainer, record: RunRecord, splits, model, hub_model_id
) -> None:
    """training_curves.png, samples.png, then the model card (README.md) last: saving a model rewrites README.md."""
    output_dir = Path(args.training.output_dir)
    history = record.log_history if record.log_history is not None else trainer.state.log_history
    plot_training_curves(history, output_dir / "training_curves.png", baseline=record.metrics.get("baseline"))
    if record.test is not None and len(record.test):
        shown = range(min(GALLERY_SIZE, len(record.test)))
        samples = build_samples(
            [record.test[i]["image"] for i in shown],
            record.test_captions,
            record.test.references,
            baselines=record.gallery_baseline,
            limit=GALLERY_SIZE,
        )
        plot_samples(samples, output_dir / "samples.png")
    context = build_card_context(
        *args,
        family=plan.family,
        label_smoothing=plan.label_smoothing,
        split_sizes=count_split_sizes(splits),
        lora_target_modules=adapted_module_names(model),
        hub_model_id=hub_model_id,
        output_dir=output_dir,
        license=args.caption.license,
    )
    write_model_card(output_dir, context)


if __name__ == "__main__":
    main()
