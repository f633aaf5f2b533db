#!/usr/bin/env python
"""Fine-tune a BLIP or BLIP-2 captioner on your images and captions (LoRA by default), evaluate it with the COCO
caption metrics, and write an adapter or model that loads with transformers/peft.

    accelerate launch run_captioning.py --config configs/blip_base_lora.yaml --dataset_dir data/flickr8k
    python run_captioning.py --help
"""

from __future__ import annotations

import logging
import sys

import datasets
import transformers
from transformers import EarlyStoppingCallback, set_seed
from transformers.trainer_utils import IntervalStrategy

from captioning.arguments import parse_args, validate_args
from captioning.checkpoints import MarkCompleteCheckpoints, resolve_resume_checkpoint
from captioning.data import CaptionImages, CaptionPairs, load_caption_splits
from captioning.families import detect_family
from captioning.hub import check_push_config, push_output_dir
from captioning.modeling import (
    apply_label_smoothing,
    base_model_path,
    check_adapter_args,
    check_label_smoothing,
    image_feature_module,
    load_config,
    load_model,
    load_processor,
    vision_tower_frozen,
)
from captioning.outputs import write_captioning_config, write_predictions
from captioning.trainer import CaptioningTrainer, build_generation_kwargs
from collators import CaptionCollator, build_layout
from metrics import CaptionScorer

logger = logging.getLogger("run_captioning")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the job the flags describe; returns the metrics of each phase that ran (also written to output_dir)."""
    model_args, data_args, lora_args, caption_args, training_args = parse_args(argv)
    setup_logging(training_args)
    validate_args(model_args, data_args, lora_args, caption_args, training_args)
    check_push_config(training_args.push_to_hub, training_args.hub_model_id, training_args.hub_token)
    push_requested, training_args.push_to_hub = training_args.push_to_hub, False  # the Trainer never pushes
    training_args.resume_from_checkpoint = resolve_resume_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    check_adapter_args(model_args, lora_args)
    config = load_config(model_args)
    family = detect_family(config)
    check_label_smoothing(family, training_args.label_smoothing_factor)
    set_seed(training_args.seed)

    splits = load_caption_splits(data_args, cache_dir=model_args.cache_dir)
    check_splits(splits, training_args, caption_args)

    processor = load_processor(model_args)
    model = load_model(model_args, lora_args, config, family)
    apply_label_smoothing(model, family, training_args.label_smoothing_factor)
    training_args.label_smoothing_factor = 0.0  # applied inside BLIP's loss, where the logits are aligned
    layout = build_layout(family, model.config, processor.tokenizer, data_args.caption_prompt)
    group_images = training_args.captions_per_image_in_batch > 1 and vision_tower_frozen(model, family)
    if group_images:
        logger.info(
            "Vision tower frozen: up to %d captions of an image share a batch and one vision pass.",
            training_args.captions_per_image_in_batch,
        )

    trainer = CaptioningTrainer(
        model=model,
        args=training_args,
        train_dataset=CaptionPairs(splits["train"]) if "train" in splits else None,
        eval_dataset=CaptionImages(splits["validation"]) if "validation" in splits else None,
        data_collator=CaptionCollator(
            processor.image_processor, processor.tokenizer, layout, data_args.max_caption_length, group_images
        ),
        processing_class=processor,
        layout=layout,
        generation_kwargs=build_generation_kwargs(caption_args, family),
        scorer=CaptionScorer(use_meteor=caption_args.compute_meteor),
        image_feature_module=image_feature_module(model, family),
        captions_per_image_in_batch=training_args.captions_per_image_in_batch if group_images else 1,
        callbacks=[MarkCompleteCheckpoints(), *early_stopping(caption_args)],
    )
    if trainer.is_world_process_zero():
        write_captioning_config(
            training_args.output_dir,
            family=family.name,
            base_model=base_model_path(model_args),
            caption_prompt=data_args.caption_prompt,
            generation_kwargs=trainer.generation_kwargs,
            max_caption_length=data_args.max_caption_length,
        )
    try:
        results = run_phases(trainer, splits, caption_args, training_args)
    finally:
        trainer.scorer.close()
    if push_requested and trainer.is_world_process_zero():
        push_output_dir(training_args.output_dir, training_args.hub_model_id, private=training_args.hub_private_repo)
    return results


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    level = logging.INFO if training_args.should_log else logging.WARNING
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


def run_phases(trainer: CaptioningTrainer, splits: dict, caption_args, training_args) -> dict[str, dict[str, float]]:
    """Baseline, train, evaluate, predict: each writes its results file in output_dir."""
    results: dict[str, dict[str, float]] = {}
    if caption_args.eval_baseline:
        logger.info("Evaluating the model before fine-tuning (baseline)")
        results["baseline"] = trainer.evaluate()
        trainer.save_metrics("baseline", results["baseline"], combined=False)

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics)
        metrics["train_images"] = len(splits["train"])
        metrics["train_samples"] = len(trainer.train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(trainer.eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics

    if training_args.do_predict:
        test = CaptionImages(splits["test"])
        output = trainer.predict(test, metric_key_prefix="test")
        metrics = dict(output.metrics)
        metrics["test_samples"] = len(test)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            write_predictions(
                f"{training_args.output_dir}/predictions.jsonl", test.image_ids, output.predictions, test.references
            )
        results["predict"] = metrics
    return results


if __name__ == "__main__":
    main()
