#!/usr/bin/env python
"""Training throughput (caption-samples/s) of one BLIP-base-shaped LoRA model, three ways, in one run:

  (a) seed-style: a torch Dataset that opens the image and calls the processor per row with
      padding="max_length" (512 tokens) and labels=input_ids, random row order, default collate, stock HF Trainer;
  (b) ours, ungrouped: CaptionPairs over the images preprocessed once (uint8 cache) + CaptionCollator(group_images=
      False), random rows, CaptioningTrainer;
  (c) ours, grouped: the same + CaptionCollator(group_images=True) + ImageGroupedBatchSampler(5 captions of an
      image per batch) + expand_image_features, CaptioningTrainer (its own get_train_dataloader and compute_loss).
  (d) ours, feature cache: (c) on the vision tower's output computed once per image (--cache_image_features, the
      default here): batches carry the features, the vision tower never runs in a step.
The one-time preprocessing of our pipeline is timed and reported apart (preprocess_s_once). For (d) the one-time
feature pass is timed too (feature_cache_build_s), and samples_per_s_feature_cache is the throughput of a 5-epoch
run with that pass included (every image's 5 captions per epoch); feature_cache_speedup compares it with (c).

All three run ``Trainer.train`` on the same model object (random weights, vision tower frozen, LoRA r 16 on the text
decoder's query/value through the project's ``load_model``), the same JPEG files, the same rows per optimizer step,
AdamW, DataLoader workers and precision. A step's time is the wall time between two consecutive ``on_step_end``
callbacks (batch fetch + forward + backward + clip + AdamW); the figure is the median after warm-up.

    .venv/bin/python benchmarks/train_throughput.py            # full run (2.5-4 min on 2 busy CPU cores)
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run (~15 s, tiny model, meaningless figures)
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import common
import torch
from PIL import Image
from torch.utils.data import BatchSampler, Dataset, RandomSampler, default_collate
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from captioning.arguments import CaptioningTrainingArguments
from captioning.data import CaptionImages, CaptionPairs
from captioning.families import BLIP
from captioning.feature_cache import FeatureFeed, FeatureStore, build_feature_store
from captioning.grouping import ImageGroupedBatchSampler
from captioning.image_cache import build_image_cache
from captioning.modeling import image_feature_module
from captioning.trainer import CaptioningTrainer
from collators import CaptionCollator, build_layout

SEED_STYLE_MAX_LENGTH = 512  # BLIP's tokenizer model_max_length: what padding="max_length" pads to in the notebooks
MODES = ("seed_style", "ungrouped", "grouped", "feature_cache")
EPOCHS = 5  # of the run that samples_per_s_feature_cache amortizes the feature pass over
SPEEDUPS = {  # key: (numerator mode, denominator mode) of the samples/s ratio
    "speedup_vs_seed_style": ("grouped", "seed_style"),
    "grouping_speedup": ("grouped", "ungrouped"),
    "ungrouped_speedup_vs_seed_style": ("ungrouped", "seed_style"),
    "feature_cache_speedup": ("feature_cache", "grouped"),
}


class SeedStyleCaptionDataset(Dataset):
    """One row per (image, caption), as the public BLIP fine-tuning notebooks build it: the image is opened and the
    processor called per row, every caption padded to 512 tokens, ``labels`` = ``input_ids`` (pads in the loss)."""

    def __init__(self, rows: list[dict], processor, max_length: int = SEED_STYLE_MAX_LENGTH):
        self.pairs = [(row["image"], caption) for row in rows for caption in row["references"]]
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, caption = self.pairs[i]
        image = Image.open(path).convert("RGB")
        encoding = self.processor(
            images=image, text=caption, padding="max_length", max_length=self.max_length, return_tensors="pt"
        )
        encoding = {key: value.squeeze(0) for key, value in encoding.items()}
        encoding["labels"] = encoding["input_ids"].clone()
        return encoding


class StepTimes(TrainerCallback):
    """Wall time between consecutive optimizer-step ends (the first step, with worker start-up, has no interval)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():  # the step's kernels are queued, not done, when the Trainer returns from it
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:], strict=False)]


def training_kwargs(args, steps: int, output_dir: Path, precision: str) -> dict:
    """Identical Trainer settings for the three modes (``steps`` optimizer steps after ``args.warmup``)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + steps,
        learning_rate=5e-5,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs it
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )


def build_trainer(
    mode: str, model, processor, rows, args, steps: int, output_dir: Path, precision: str, timer, cache=None
):
    kwargs = training_kwargs(args, steps, output_dir, precision)
    if mode == "seed_style":
        return Trainer(
            model=model,
            args=TrainingArguments(**kwargs),
            train_dataset=SeedStyleCaptionDataset(rows, processor),
            data_collator=default_collate,
            callbacks=[timer],
        )
    grouped = mode in ("grouped", "feature_cache")
    features = cache if mode == "feature_cache" else None
    cache = None if mode == "feature_cache" else cache
    layout = build_layout(BLIP, model.config, processor.tokenizer)
    captions_per_image = common.CAPTIONS_PER_IMAGE if grouped else 1
    return CaptioningTrainer(  # exactly as run_captioning.main builds it (training part)
        model=model,
        args=CaptioningTrainingArguments(captions_per_image_in_batch=captions_per_image, **kwargs),
        train_dataset=CaptionPairs(common.per_image_dataset(rows), cache=cache, features=features),
        data_collator=CaptionCollator(processor.image_processor, processor.tokenizer, layout, 64, grouped),
        processing_class=processor,
        layout=layout,
        generation_kwargs={},
        scorer=None,
        image_feature_module=image_feature_module(model, BLIP),
        captions_per_image_in_batch=captions_per_image,
        feature_feed=feature_feed(model, processor, features),
        callbacks=[timer],
    )


def build_features(
    model, processor, rows, cache, folder: Path, precision: str, batch_size: int = 10, num_workers: int = 2
) -> FeatureStore:
    """The vision tower's output for every image, once, as run_captioning builds it (``batch_size`` images at a
    time, their pixels prepared by ``num_workers`` DataLoader workers), stored in the run's precision (bf16 under
    bf16 autocast, where the layer norm's output is fp32)."""
    layout = build_layout(BLIP, model.config, processor.tokenizer)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout)
    feed = FeatureFeed(model, BLIP, layout)
    device = next(feed.module.parameters()).device

    def compute(inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            records, structure = feed.records({"pixel_values": inputs["pixel_values"].to(device)})
        if precision == "bf16":
            records = [{name: value.to(torch.bfloat16) for name, value in record.items()} for record in records]
        return records, structure

    images = CaptionImages(common.per_image_dataset(rows), cache)
    return build_feature_store(
        images,
        collator.processed_images,
        compute,
        folder=folder,
        batch_size=batch_size,
        show_progress=False,
        num_workers=num_workers,
    )


def feature_feed(model, processor, features: FeatureStore | None) -> FeatureFeed | None:
    """What feeds ``features`` to the model in place of its vision tower, as run_captioning sets it up."""
    if features is None:
        return None
    feed = FeatureFeed(model, BLIP, build_layout(BLIP, model.config, processor.tokenizer))
    feed.structure = features.structure
    return feed


def first_batch_shape(trainer) -> dict:
    """What one step computes on: images through the vision tower, and caption rows x tokens through the decoder."""
    batch = next(iter(trainer.get_train_dataloader()))
    images = batch["pixel_values"] if "pixel_values" in batch else batch["image_features"]
    return {"images_per_step": len(images), "tokens_per_row": int(batch["input_ids"].shape[1])}


def data_ms_per_row(trainer, mode: str, batch_size: int, batches: int = 3) -> float:
    """CPU time to produce one caption row of a batch in the main process (no workers): image decode, processor,
    tokenizer, collate. How many rows/s one DataLoader worker can feed."""
    dataset = trainer.train_dataset
    if mode in ("grouped", "feature_cache"):
        sampler = ImageGroupedBatchSampler(dataset.image_index, batch_size, common.CAPTIONS_PER_IMAGE, seed=1)
    else:
        sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(1)), batch_size, False)
    collate = trainer.data_collator
    times = []
    for _, indices in zip(range(batches), sampler, strict=False):
        started = time.process_time()
        collate([dataset[i] for i in indices])
        times.append((time.process_time() - started) * 1000 / len(indices))
    return common.median(times)


def measure(mode: str, model, processor, rows, args, steps: int, workdir: Path, precision: str, cache=None) -> dict:
    timer = StepTimes()
    trainer = build_trainer(mode, model, processor, rows, args, steps, workdir / f"out-{mode}", precision, timer, cache)
    trainer.remove_callback(PrinterCallback)
    shape = first_batch_shape(trainer)
    shape["data_ms_per_row"] = data_ms_per_row(trainer, mode, args.batch_size)
    elapsed = common.Stopwatch()
    trainer.train()
    total = elapsed()
    timed = timer.intervals()[args.warmup - 1 :]
    step_s = common.median(timed)
    return {
        "samples_per_s": args.batch_size / step_s,
        "median_step_s": step_s,
        "step_s": [round(value, 3) for value in timed],
        "train_wall_s": total,
        **shape,
    }


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=384, help="Model input size (BLIP-base: 384).")
    parser.add_argument("--batch_size", type=int, default=10, help="Caption rows per optimizer step (all modes).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per ours-mode (default 8; quick 3).")
    parser.add_argument("--seed_style_steps", type=int, default=None, help="Timed seed-style steps (default 4).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (at least 1).")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (the project's default, 2).")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on AMX.")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of " + ", ".join(MODES))
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step has no start time)")
    threads = common.set_threads(args.threads)
    precision = common.resolve_precision(args.precision)
    hf_logging.set_verbosity_error()
    logging.getLogger("captioning").setLevel(logging.WARNING)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]

    dims = dict(hidden=64, layers=2, image_size=64) if args.quick else dict(image_size=args.image_size)
    ours_steps = args.steps or (3 if args.quick else 8)
    seed_steps = args.seed_style_steps or (2 if args.quick else 4)
    images = (max(ours_steps, seed_steps) + args.warmup + 1) * args.batch_size // common.CAPTIONS_PER_IMAGE + 2

    wall = common.Stopwatch()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        checkpoint = common.build_checkpoint(workdir / "blip", **dims)
        rows = common.make_image_folder(workdir / "images", images)
        model, processor = common.load_lora_model(checkpoint)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # Our pipeline decodes and resizes each image once, before training (--preprocess_images, the default);
        # that one-time cost is reported apart from the per-step throughput.
        preprocess = common.Stopwatch()
        cache = build_image_cache(
            common.per_image_dataset(rows),
            processor.image_processor,
            root=workdir / "cache",
            num_workers=args.num_workers,
            show_progress=False,
        )
        preprocess_s = preprocess()
        feature_s, features = None, None
        if "feature_cache" in modes:
            started = common.Stopwatch()
            features = build_features(
                model, processor, rows, cache, workdir / "features", precision, num_workers=args.num_workers
            )
            feature_s = started()
        results = {}
        for mode in modes:
            steps = seed_steps if mode == "seed_style" else ours_steps
            source = {"seed_style": None, "feature_cache": features}.get(mode, cache)
            results[mode] = measure(mode, model, processor, rows, args, steps, workdir, precision, source)
            print(f"{mode}: {results[mode]}", flush=True)
        if features is not None:  # a 5-epoch run of every image's 5 captions, the feature pass included
            samples = EPOCHS * images * common.CAPTIONS_PER_IMAGE
            results["feature_cache"]["steps_samples_per_s"] = results["feature_cache"]["samples_per_s"]
            results["feature_cache"]["samples_per_s"] = samples / (
                samples / results["feature_cache"]["steps_samples_per_s"] + feature_s
            )

    output = {"benchmark": "train_throughput"}
    for mode in modes:
        output[f"samples_per_s_{mode}"] = round(results[mode]["samples_per_s"], 3)
    for key, (faster, slower) in SPEEDUPS.items():
        if faster in results and slower in results:
            output[key] = round(results[faster]["samples_per_s"] / results[slower]["samples_per_s"], 2)
    output.update({f"median_step_s_{mode}": round(results[mode]["median_step_s"], 3) for mode in modes})
    output.update({f"step_s_{mode}": results[mode]["step_s"] for mode in modes})
    output.update({f"images_per_step_{mode}": results[mode]["images_per_step"] for mode in modes})
    output.update({f"tokens_per_row_{mode}": results[mode]["tokens_per_row"] for mode in modes})
    output.update({f"data_ms_per_row_{mode}": round(results[mode]["data_ms_per_row"], 2) for mode in modes})
    output["preprocess_s_once"] = round(preprocess_s, 2)
    if feature_s is not None:
        output["feature_cache_build_s"] = round(feature_s, 2)
        output["feature_cache_ms_per_image"] = round(1000 * feature_s / images, 2)
        output["samples_per_s_feature_cache_steps_only"] = round(results["feature_cache"]["steps_samples_per_s"], 3)
    output["preprocess_ms_per_image_once"] = round(1000 * preprocess_s / images, 2)
    output["settings"] = {
        "model": common.model_description(args.quick),
        "image_size": dims["image_size"],
        "source_images": f"{common.SOURCE_IMAGE_SIZE[0]}x{common.SOURCE_IMAGE_SIZE[1]} JPEG q90",
        "images": images,
        "captions_per_image": common.CAPTIONS_PER_IMAGE,
        "batch_rows": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps_ours": ours_steps,
        "timed_steps_seed_style": seed_steps,
        "seed_style_max_length": SEED_STYLE_MAX_LENGTH,
        "lora": "r 16, alpha 32, dropout 0.05, text decoder query/value",
        "trainable_params": trainable,
        "precision": precision,
        "num_workers": args.num_workers,
        "threads": threads,
        "quick": args.quick,
        "wall_s": round(wall(), 1),
        **common.machine_info(),
    }
    common.emit(output, args.json_out)
    return output


if __name__ == "__main__":
    main()
