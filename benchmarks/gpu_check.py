#!/usr/bin/env python
"""GPU check: seed-004's pipelines measured on one CUDA GPU in under 8 minutes, nothing downloaded.

A BLIP-base-shaped captioner with random weights at 384 px (benchmarks/common.py), LoRA r 16 on the text decoder's
query/value, bf16, on a synthetic Flickr8k-sized image folder (8,091 photo-like 500x375 JPEGs with 5 captions each,
drawn on the fly by all CPUs). It measures, with train_throughput.py's machinery and 128 caption rows per step:

  training caption-samples/s of the seed-style, grouped and feature-cache paths (median step after warm-up, a fixed
  number of steps, not epochs), and each path's peak GPU memory;
  evaluation images/s (run_captioning --do_eval on a bounded number of validation images: ours on pixels, ours on
  cached features, and the stock per-row Seq2SeqTrainer of eval_throughput.py);
  the one-time costs: JPEG generation (reported apart), preprocessing all images into the uint8 cache, the feature
  cache over all images;

and projects the seed-004 run (estimate_h200.py's SEED004: 5 epochs over 6,000 training images x 5 captions, 8
evaluations of 1,000 images) for each path from those rates. Progress lines with the elapsed time go to stderr;
the last line of stdout is ONE JSON line. A time budget (--budget_s) shortens or skips the optional stages (the
seed-style steps, the stock evaluation) when earlier ones ran long.

    sh benchmarks/gpu_check.sh                 # on a CUDA machine: ~3-5 min on one H200 (16 CPU cores)
    sh benchmarks/gpu_check.sh --quick         # CPU smoke run (tiny model, 40 images, same code paths and keys)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import gc
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import common
import estimate_h200
import numpy as np
import torch
from eval_throughput import GENERATION, evaluate_with_main, run_stock
from train_throughput import build_features, measure
from transformers.utils import logging as hf_logging

from captioning.image_cache import build_image_cache
from captioning.workers import process_pool

MODES = ("grouped", "feature_cache", "seed_style")  # in the order they run: the optional one last
EVAL_SIDES = ("ours", "feature_cache", "stock_per_row")
CHUNK = 64  # images per generation task
SEED004 = estimate_h200.SEED004


class Progress:
    """Elapsed time since the start, the budget left, and progress lines on stderr."""

    def __init__(self, budget_s: float):
        self.clock = common.Stopwatch()
        self.budget_s = budget_s

    def remaining(self) -> float:
        return self.budget_s - self.clock()

    def __call__(self, message: str) -> None:
        print(f"[gpu_check {self.clock():6.1f} s] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="Synthetic images (default 8091, Flickr8k; quick 40).")
    parser.add_argument("--image_size", type=int, default=384, help="Model input size (BLIP-base: 384).")
    parser.add_argument("--batch_size", type=int, default=None, help="Caption rows per training step (128; quick 10).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps, grouped and feature cache (20; quick 3).")
    parser.add_argument("--seed_style_steps", type=int, default=None, help="Timed seed-style steps (5; quick 1).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first, at least 1 (3; quick 1).")
    parser.add_argument("--eval_images", type=int, default=None, help="Images per timed evaluation (256; quick 4).")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="Per-device eval batch (128; quick 4).")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers (seed-004's 8, at most the CPUs)."
    )
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPUs.")
    parser.add_argument(
        "--budget_s", type=float, default=420.0, help="Past this, the optional stages are shortened or skipped."
    )
    parser.add_argument(
        "--hard_timeout_s",
        type=float,
        default=570.0,
        help="A hang ends here: every thread's stack goes to stderr and the process exits 1.",
    )
    return parser


def settle_defaults(args) -> argparse.Namespace:
    """The quick or full value of every size flag left unset."""
    quick = args.quick
    defaults = dict(
        images=40 if quick else common.FLICKR8K_IMAGES,
        batch_size=10 if quick else 128,
        steps=3 if quick else 20,
        seed_style_steps=1 if quick else 5,
        warmup=1 if quick else 3,
        eval_images=4 if quick else 256,
        eval_batch_size=4 if quick else 128,
        num_workers=min(2 if quick else SEED004["workers"], os.cpu_count() or 1),
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1:
        raise ValueError(f"--warmup {args.warmup}: the first step has no start time; pass at least 1.")
    if args.eval_images > args.images:
        raise ValueError(f"--eval_images {args.eval_images} exceeds --images {args.images}; lower it.")
    return args


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def generate_images(root: Path, count: int, workers: int, seed: int = 0) -> list[dict]:
    """``count`` photo-like JPEGs with 5 captions each in ``root`` (the image-folder layout of
    common.make_image_folder), drawn by ``workers`` processes in chunks of CHUNK images, each chunk from its own
    seed (the same images for any number of workers)."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root, start, min(start + CHUNK, count), seed) for start in range(0, count, CHUNK)]
    if workers <= 1 or len(jobs) == 1:
        chunks = [_draw_chunk(job) for job in jobs]
    else:
        with process_pool(min(workers, len(jobs))) as pool:
            chunks = list(pool.map(_draw_chunk, jobs))
    rows = [row for chunk in chunks for row in chunk]
    lines = [json.dumps({"file_name": Path(row["image"]).name, "caption": row["references"]}) for row in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def _draw_chunk(job) -> list[dict]:
    root, start, stop, seed = job
    rng = np.random.default_rng([seed, start])
    rows = []
    for i in range(start, stop):
        name = f"img_{i:05d}.jpg"
        common.make_image(rng).save(root / name, quality=90)
        captions = [common.make_caption(rng) for _ in range(common.CAPTIONS_PER_IMAGE)]
        rows.append({"image": str(root / name), "references": captions, "image_id": name})
    return rows


def eval_folder(root: Path, rows: list[dict]) -> Path:
    """``root/validation/``: hard links to ``rows``' JPEGs (copies across file systems) + metadata.jsonl, a
    dataset folder whose only split is validation, for run_captioning --do_eval."""
    split = root / "validation"
    split.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = split / Path(row["image"]).name
        try:
            os.link(row["image"], target)
        except OSError:
            shutil.copyfile(row["image"], target)
    lines = [json.dumps({"file_name": Path(row["image"]).name, "caption": row["references"]}) for row in rows]
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------------------------------------------
# Machine limits
# --------------------------------------------------------------------------------------------------------------


def disk_needed(args, dims: dict) -> int:
    """Bytes this run writes: JPEGs (~60 KB), the uint8 cache and the feature store for every image, the
    checkpoint (fp32), and the evaluation runs' caches."""
    size = dims["image_size"]
    tokens, hidden = (size // 16) ** 2 + 1, dims.get("hidden", 768)
    per_image = 60_000 + 3 * size * size + tokens * hidden * 4
    checkpoint = 1_000_000_000 if not args.quick else 20_000_000
    return int(args.images * per_image + 2 * args.eval_images * per_image + checkpoint)


def check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > 0.9 * free:
        raise SystemExit(
            f"gpu_check needs ~{needed / 1e9:.1f} GB in {folder}, which has {free / 1e9:.1f} GB free: pass "
            "--workdir on a larger disk, or fewer --images."
        )


def shm_free() -> int | None:
    """Free bytes of /dev/shm, where DataLoader workers hand their batches over (None where there is none)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def fit_workers(requested: int, batch_bytes: int, free: int | None, log) -> int:
    """DataLoader workers whose prefetched batches (2 each) fit in /dev/shm with a 25% margin: a container's
    small /dev/shm kills workers with a bus error mid-run, which costs more than fewer workers."""
    if free is None or requested == 0:
        return requested
    fitting = int(free // (2 * batch_bytes * 1.25))
    if fitting >= requested:
        return requested
    log(
        f"WARNING: /dev/shm has {free / 2**30:.2f} GiB free, {requested} workers x 2 batches of "
        f"{batch_bytes / 2**20:.0f} MiB need more: using {fitting} workers (run the container with a larger "
        "--shm-size for the full count)"
    )
    return fitting


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def device_peak_mb(reset: bool = False) -> float | None:
    """torch.cuda.max_memory_allocated in MiB since the last reset (None without CUDA); ``reset`` starts anew."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def release_memory() -> None:
    """Drop what the finished stage left (a trainer's reference cycles hold its model) before the next loads one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Stages:
    """Runs the optional stages: one that fails is recorded (its traceback on stderr) and the check goes on, so
    that one session on a GPU machine still yields every figure it can; the process then exits 1."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.errors: dict[str, str] = {}
        self.skipped: list[str] = []

    def run(self, name: str, function):
        """``function()``, or None when it raised."""
        try:
            return function()
        except Exception as error:
            traceback.print_exc()
            self.errors[name] = f"{type(error).__name__}: {error}"[:400]
            self.progress(f"{name} FAILED ({self.errors[name]}); going on without it")
            return None
        finally:
            release_memory()


@dataclasses.dataclass
class Prepared:
    """What the measurements run on, and the one-time passes' seconds (``once``)."""

    rows: list[dict]
    checkpoint: Path
    model: torch.nn.Module | None
    processor: object
    cache: object
    features: object
    once: dict[str, float]
    jpeg_bytes: int
    feature_bytes: int
    feature_peak_mb: float | None
    trainable: int


def prepare(args, dims: dict, workdir: Path, precision: str, progress: Progress, stages: Stages) -> Prepared:
    """The images (all CPUs), the checkpoint, the model with LoRA on the device, the uint8 cache of every image (all
    CPUs, before CUDA starts in this process) and the feature cache of every image, each timed."""
    cpus = os.cpu_count() or 1
    once: dict[str, float] = {}
    clock = common.Stopwatch()
    rows = generate_images(workdir / "images", args.images, cpus)
    once["generate_s"] = clock()
    jpeg_bytes = sum(Path(row["image"]).stat().st_size for row in rows)
    progress(f"generated {args.images} JPEGs ({jpeg_bytes / len(rows) / 1024:.0f} KiB each) on {cpus} processes")

    clock = common.Stopwatch()
    checkpoint = common.build_checkpoint(workdir / "blip", **dims)
    once["checkpoint_s"] = clock()
    progress(f"checkpoint built and saved: {once['checkpoint_s']:.1f} s")

    clock = common.Stopwatch()
    model, processor = common.load_lora_model(checkpoint)
    once["model_load_s"] = clock()
    clock = common.Stopwatch()
    split = common.per_image_dataset(rows)
    cache = build_image_cache(split, processor.image_processor, root=workdir / "cache", num_workers=cpus)
    once["preprocess_s"] = clock()
    progress(f"preprocessed {args.images} images into the uint8 cache on {cpus} processes: {clock():.1f} s")

    clock = common.Stopwatch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    once["model_load_s"] += clock()
    progress(f"model loaded with LoRA onto {device}: {once['model_load_s']:.1f} s")

    device_peak_mb(reset=True)
    clock = common.Stopwatch()
    features = stages.run(
        "feature cache build",
        lambda: build_features(
            model,
            processor,
            rows,
            cache,
            workdir / "features",
            precision,
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
        ),
    )
    once["feature_cache_build_s"] = clock()
    feature_peak_mb = device_peak_mb()
    feature_bytes = features.nbytes if features is not None else 0
    progress(
        f"feature cache of {args.images} images built: {once['feature_cache_build_s']:.1f} s, "
        f"{feature_bytes / 2**30:.2f} GiB ({feature_bytes / args.images / 1024:.0f} KiB per image)"
    )
    return Prepared(
        rows=rows,
        checkpoint=checkpoint,
        model=model,
        processor=processor,
        cache=cache,
        features=features,
        once=once,
        jpeg_bytes=jpeg_bytes,
        feature_bytes=feature_bytes,
        feature_peak_mb=feature_peak_mb,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def measure_training(data: Prepared, args, workdir: Path, precision: str, progress: Progress, stages: Stages) -> dict:
    """train_throughput.measure of each path with its peak GPU memory; the seed-style path (the slowest, run
    last) is cut to 1 timed step, or skipped, when the budget runs short."""
    training = {}
    for mode in MODES:
        steps = args.seed_style_steps if mode == "seed_style" else args.steps
        if mode == "feature_cache" and data.features is None:
            stages.skipped.append("training feature_cache (no feature cache)")
            continue
        if mode == "seed_style" and progress.remaining() < 120:
            if progress.remaining() < 40:
                progress(f"budget: {progress.remaining():.0f} s left, the seed-style path is skipped")
                stages.skipped.append("training seed_style")
                continue
            steps = 1
            stages.skipped.append("training seed_style shortened to 1 timed step")
            progress(f"budget: {progress.remaining():.0f} s left, the seed-style path runs 1 timed step")
        source = {"seed_style": None, "feature_cache": data.features}.get(mode, data.cache)
        device_peak_mb(reset=True)
        clock = common.Stopwatch()
        result = stages.run(
            f"training {mode}",
            functools.partial(
                measure, mode, data.model, data.processor, data.rows, args, steps, workdir, precision, source
            ),
        )
        if result is None:
            continue
        result["peak_gpu_mb"] = device_peak_mb()
        training[mode] = result
        progress(
            f"training {mode}: {result['samples_per_s']:.1f} samples/s (median step {result['median_step_s']:.3f} s "
            f"of {steps} timed), {result['images_per_step']} images and {result['tokens_per_row']} tokens per row, "
            f"peak GPU {result['peak_gpu_mb']} MiB, {clock():.1f} s"
        )
    return training


def run_eval_ours(checkpoint: Path, folder: Path, args, precision: str, workdir: Path, features: bool) -> dict:
    """run_captioning --do_eval as a user runs it (eval_throughput.py's ours) into ``workdir``, on pixels or on
    cached features; ``eval_runtime`` is the Trainer's evaluate() alone (model load, preprocessing and the feature
    pass excluded)."""
    output_dir, cache_dir = workdir / "out", workdir / "cache"
    metrics = evaluate_with_main(
        checkpoint,
        folder,
        output_dir,
        precision,
        args.eval_batch_size,
        args.num_workers,
        preprocessing_num_workers=os.cpu_count(),
        image_cache_dir=str(cache_dir),
        cache_image_features=features,
    )
    stores = cache_dir / "features"
    used = stores.is_dir() and any(stores.iterdir())
    if used != features:
        raise RuntimeError(f"--cache_image_features {features} but the feature cache was {'' if used else 'not '}built")
    return {"seconds": float(metrics["eval_runtime"]), "images": int(metrics["eval_samples"])}


def measure_evaluation(data: Prepared, args, precision: str, workdir: Path, progress, stages: Stages) -> dict:
    """Images/s of our evaluation on pixels and on cached features, and of the stock per-row evaluation, over the
    first --eval_images images, each with its peak GPU memory, after an untimed warm-up on 2 images. The stock
    side (the slowest) is skipped when the budget runs short."""
    rows = data.rows[: args.eval_images]
    folder = eval_folder(workdir / "eval", rows)
    clock = common.Stopwatch()
    warm = argparse.Namespace(eval_batch_size=2, num_workers=args.num_workers)
    warm_folder = eval_folder(workdir / "eval-warmup", rows[:2])
    stages.run(
        "evaluation warm-up",
        lambda: run_eval_ours(data.checkpoint, warm_folder, warm, precision, workdir / "eval-warmup-run", False),
    )
    progress(f"evaluation warm-up: {clock():.1f} s")
    stock_args = argparse.Namespace(batch_size=args.eval_batch_size, num_workers=args.num_workers)
    runs = {
        "ours": lambda: run_eval_ours(data.checkpoint, folder, args, precision, workdir / "eval-ours", False),
        "feature_cache": lambda: run_eval_ours(data.checkpoint, folder, args, precision, workdir / "eval-fc", True),
        "stock_per_row": lambda: run_stock(data.checkpoint, rows, stock_args, precision, workdir / "eval-stock"),
    }
    results: dict[str, dict] = {}
    for side, run in runs.items():
        if side == "stock_per_row" and progress.remaining() < 60:
            progress(f"budget: {progress.remaining():.0f} s left, the stock per-row evaluation is skipped")
            stages.skipped.append("evaluation stock_per_row")
            continue
        device_peak_mb(reset=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's printed metrics: stdout ends in the JSON
            result = stages.run(f"evaluation {side}", run)
        if result is None:
            continue
        result["peak_gpu_mb"] = device_peak_mb()
        results[side] = result
        images, seconds = result["images"], result["seconds"]
        progress(f"evaluation {side}: {images / seconds:.2f} images/s ({images} in {seconds:.1f} s)")
    return results


def project_seed004(training: dict, evaluation: dict, once: dict, images: int) -> dict:
    """Seconds of the seed-004 run for each path, from this run's rates: one-time passes scaled from ``images``
    to seed-004's image counts, 150,000 caption-samples, 8 evaluations of 1,000 images (the test pass on pixels
    for the feature cache, which holds training and validation images), and this run's model load."""
    samples = SEED004["train_images"] * SEED004["captions_per_image"] * SEED004["epochs"]
    eval_count = SEED004["eval_images"] * SEED004["eval_passes"]
    validation_count = SEED004["eval_images"] * (SEED004["eval_passes"] - SEED004["test_passes"])
    all_images = SEED004["train_images"] + 2 * SEED004["eval_images"]
    cached_images = SEED004["train_images"] + SEED004["eval_images"]

    def per_image_s(side: str) -> float | None:
        result = evaluation.get(side)
        return result["seconds"] / result["images"] if result else None

    def train_s(mode: str) -> float | None:
        return samples / training[mode]["samples_per_s"] if mode in training else None

    ours, cached, stock = per_image_s("ours"), per_image_s("feature_cache"), per_image_s("stock_per_row")
    paths = {
        "seed_style": {
            "train_s": train_s("seed_style"),
            "eval_s": eval_count * stock if stock else None,
        },
        "grouped": {
            "preprocess_s": once["preprocess_s"] * all_images / images,
            "train_s": train_s("grouped"),
            "eval_s": eval_count * ours,
        },
        "feature_cache": {
            "preprocess_s": once["preprocess_s"] * all_images / images,
            "feature_pass_s": once["feature_cache_build_s"] * cached_images / images,
            "train_s": train_s("feature_cache"),
            "eval_s": validation_count * cached + (eval_count - validation_count) * ours,
        },
    }
    projected = {}
    for path, terms in paths.items():
        terms["fixed_s"] = once["model_load_s"]
        complete = all(value is not None for value in terms.values())
        projected[path] = round(sum(terms.values()), 1) if complete else None
        paths[path] = {key: None if value is None else round(value, 1) for key, value in terms.items()}
    return {"totals": projected, "parts": paths}


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def ratio(results: dict, faster: str, slower: str) -> float | None:
    if faster not in results or slower not in results:
        return None
    return round(results[faster]["samples_per_s"] / results[slower]["samples_per_s"], 2)


def build_output(args, data: Prepared, training, evaluation, stages, progress, precision, shm, dims) -> dict:
    """The JSON line: rates, projections, peaks, one-time passes, per-path details, what was skipped or failed."""
    projection = project_seed004(training, evaluation, data.once, args.images)
    paper = estimate_h200.estimate(estimate_h200.build_parser().parse_args([]))
    output = {"benchmark": "gpu_check"}
    for mode in MODES:
        output[f"samples_per_s_{mode}"] = round(training[mode]["samples_per_s"], 2) if mode in training else None
    output["speedup_vs_seed_style"] = ratio(training, "grouped", "seed_style")
    output["feature_cache_speedup"] = ratio(training, "feature_cache", "grouped")
    for side in EVAL_SIDES:
        result = evaluation.get(side)
        output[f"eval_images_per_s_{side}"] = round(result["images"] / result["seconds"], 2) if result else None
    for path in MODES:
        output[f"seed004_s_{path}"] = projection["totals"][path]
    output["seed004_parts_s"] = projection["parts"]
    output.update({f"estimate_seed004_s_{path}": paper[f"seed004_s_{path}"] for path in MODES})
    peaks = {"feature_cache_build": data.feature_peak_mb}
    peaks.update({f"train_{mode}": result["peak_gpu_mb"] for mode, result in training.items()})
    peaks.update({f"eval_{side}": result["peak_gpu_mb"] for side, result in evaluation.items()})
    measured = [peak for peak in peaks.values() if peak is not None]
    output["peak_gpu_mb"] = max(measured) if measured else None
    output["peak_gpu_mb_by_stage"] = peaks
    output["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    for stage in ("generate", "preprocess", "feature_cache_build"):
        output[f"{stage}_s"] = round(data.once[f"{stage}_s"], 2)
        output[f"{stage}_ms_per_image"] = round(1000 * data.once[f"{stage}_s"] / args.images, 3)
    output["feature_cache_bytes"] = data.feature_bytes
    output["feature_cache_bytes_per_image"] = data.feature_bytes // args.images
    output["model_load_s"] = round(data.once["model_load_s"], 2)
    output["checkpoint_s"] = round(data.once["checkpoint_s"], 2)
    for mode, result in training.items():
        output[f"median_step_s_{mode}"] = round(result["median_step_s"], 4)
        output[f"step_s_{mode}"] = result["step_s"]
        output[f"data_ms_per_row_{mode}"] = round(result["data_ms_per_row"], 3)
        output[f"train_wall_s_{mode}"] = round(result["train_wall_s"], 1)
    output["skipped"] = stages.skipped
    output["errors"] = stages.errors
    output["wall_s"] = round(progress.clock(), 1)
    output["within_budget"] = output["wall_s"] <= args.budget_s
    output["settings"] = {
        "model": common.model_description(args.quick),
        "image_size": dims["image_size"],
        "images": args.images,
        "jpeg_kib_per_image": round(data.jpeg_bytes / args.images / 1024, 1),
        "captions_per_image": common.CAPTIONS_PER_IMAGE,
        "batch_rows": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "timed_steps_seed_style": args.seed_style_steps,
        "eval_images": args.eval_images,
        "eval_batch_size": args.eval_batch_size,
        "generation": GENERATION,
        "lora": "r 16, alpha 32, dropout 0.05, text decoder query/value",
        "trainable_params": data.trainable,
        "precision": precision,
        "num_workers": args.num_workers,
        "shm_free_gib": None if shm is None else round(shm / 2**30, 2),
        "seed004": SEED004,
        "budget_s": args.budget_s,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        **common.machine_info(),
    }
    return output


def main(argv=None) -> dict:
    args = settle_defaults(build_parser().parse_args(argv))
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here). For the CPU smoke run of the same "
            "code paths (tiny model, figures meaningless) run: sh benchmarks/gpu_check.sh --quick"
        )
    faulthandler.dump_traceback_later(args.hard_timeout_s, exit=True)  # a hang shows where, and ends
    progress, common_threads = Progress(args.budget_s), common.set_threads(args.threads)
    stages = Stages(progress)
    precision = common.resolve_precision(args.precision)
    hf_logging.set_verbosity_error()
    logging.getLogger("captioning").setLevel(logging.WARNING)
    dims = dict(hidden=64, layers=2, image_size=64) if args.quick else dict(image_size=args.image_size)
    progress(
        f"{'quick, ' if args.quick else ''}{args.images} images, {common.model_description(args.quick)}, {precision}, "
        f"batch {args.batch_size}, {common.machine_info()['device']}, {os.cpu_count()} CPUs, {common_threads} threads"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        check_disk(workdir, disk_needed(args, dims))
        shm = shm_free()
        size = dims["image_size"]
        largest_batch = args.batch_size * (3 * size * size * 4 + 3 * 512 * 8)  # seed-style: pixels + 512 tokens
        args.num_workers = fit_workers(args.num_workers, largest_batch, shm, progress)
        data = prepare(args, dims, workdir, precision, progress, stages)
        training = measure_training(data, args, workdir, precision, progress, stages)
        data.model = data.features = data.cache = None
        release_memory()
        evaluation = measure_evaluation(data, args, precision, workdir, progress, stages)
    output = build_output(args, data, training, evaluation, stages, progress, precision, shm, dims)
    faulthandler.cancel_dump_traceback_later()
    skipped = ", ".join(stages.skipped) or "nothing"
    progress(
        f"done in {output['wall_s']} s (budget {args.budget_s:.0f} s); skipped: {skipped}; errors: {stages.errors}"
    )
    common.emit(output, args.json_out)
    if stages.errors:
        raise SystemExit(1)
    return output


if __name__ == "__main__":
    main()
