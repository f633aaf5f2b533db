#!/usr/bin/env python
"""Evaluation throughput (images/s): ours vs stock ``Seq2SeqTrainer(predict_with_generate=True)`` over caption rows.

  ours:  ``run_captioning.main --do_eval`` on an image folder (validation/metadata.jsonl, 5 captions per image):
         CaptioningTrainer.evaluate on CaptionImages, one batched beam-search generation per image (KV cache),
         scored against all 5 references, plus its teacher-forced loss over the 5 (image, caption) pairs;
  stock: ``transformers.Seq2SeqTrainer.evaluate`` on one row per (image, caption), a collator that opens the image
         and gives pixel_values / input_ids / attention_mask / labels per row (labels = input_ids, as the public
         scripts do; padded to the batch's longest caption, not to 512), ``predict_with_generate=True``: every row
         is generated (the reference ids go into ``generate`` as the prompt, which is what the stock trainer does)
         and its loss computed, and compute_metrics scores each row against its one caption.

Same checkpoint (random weights, LoRA r 16 on query/value as loaded by the project), same JPEG files, same
generation settings (3 beams, 5-20 new tokens), same per-device batch size (images for ours, rows for stock),
workers and precision. Each side's time is the Trainer's own ``eval_runtime`` (``Trainer.evaluate``: data loading,
generation, loss and the metric computation; the PTB tokenization + BLEU/ROUGE-L/CIDEr-D with the same
CaptionScorer, METEOR off on both), the median over ``--repeats`` runs after one untimed warm-up of each.

    .venv/bin/python benchmarks/eval_throughput.py            # full run (~5 min on 2 CPU cores)
    .venv/bin/python benchmarks/eval_throughput.py --quick    # smoke run (<1 min, tiny model)
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PrinterCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.utils import logging as hf_logging

import run_captioning
from captioning.arguments import to_argv
from metrics import CaptionScorer

GENERATION = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 5}


class CaptionRows(Dataset):
    """One row per (image, caption): how the stock scripts feed evaluation."""

    def __init__(self, rows: list[dict]):
        self.pairs = [(row["image"], caption) for row in rows for caption in row["references"]]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.pairs[i]
        return {"image": path, "caption": caption}


class StockRowCollator:
    """Opens each row's image and runs the processor on image + caption; ``labels`` = ``input_ids``."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        images = [Image.open(row["image"]).convert("RGB") for row in rows]
        batch = self.processor(
            images=images, text=[row["caption"] for row in rows], padding="longest", return_tensors="pt"
        )
        batch = dict(batch)
        batch["labels"] = batch["input_ids"].clone()
        return batch


def eval_folder(root: Path, num_images: int) -> list[dict]:
    """``root/validation/`` with JPEGs + metadata.jsonl: a dataset folder whose only split is validation."""
    return common.make_image_folder(root / "validation", num_images)


def run_ours(checkpoint: Path, folder: Path, args, precision: str, output_dir: Path, max_images: int | None) -> dict:
    metrics = evaluate_with_main(
        checkpoint, folder, output_dir, precision, args.batch_size, args.num_workers, max_eval_samples=max_images
    )
    return {"seconds": float(metrics["eval_runtime"]), "images": int(metrics["eval_samples"])}


def evaluate_with_main(
    checkpoint: Path, folder: Path, output_dir: Path, precision: str, batch_size: int, num_workers: int, **flags
) -> dict:
    """``run_captioning.main(["--do_eval", ...])`` as a user runs it, with the benchmark's generation and LoRA
    settings and ``flags`` on top; its evaluation metrics (the log goes to stderr only if it fails)."""
    argv = to_argv(
        model_name_or_path=str(checkpoint),
        dataset_dir=str(folder),
        do_eval=True,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        compute_meteor=False,
        per_device_eval_batch_size=batch_size,
        dataloader_num_workers=num_workers,
        num_beams=GENERATION["num_beams"],
        max_new_tokens=GENERATION["max_new_tokens"],
        min_new_tokens=GENERATION["min_new_tokens"],
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        lora_target_modules=["query", "value"],
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **flags,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return run_captioning.main(argv)["eval"]
    except Exception:
        print(log.getvalue()[-5000:], file=sys.stderr)
        raise


def run_stock(checkpoint: Path, rows: list[dict], args, precision: str, output_dir: Path) -> dict:
    model, processor = common.load_lora_model(checkpoint)
    dataset = CaptionRows(rows)
    references = [[caption] for _, caption in dataset.pairs]
    scorer = CaptionScorer(use_meteor=False)
    tokenizer = processor.tokenizer

    def compute_metrics(prediction):
        ids = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        return scorer(tokenizer.batch_decode(ids, skip_special_tokens=True), references)

    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            output_dir=str(output_dir),
            per_device_eval_batch_size=args.batch_size,
            predict_with_generate=True,
            dataloader_num_workers=args.num_workers,
            dataloader_pin_memory=torch.cuda.is_available(),
            bf16=precision == "bf16",
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=0,
        ),
        eval_dataset=dataset,
        processing_class=tokenizer,  # Seq2SeqTrainer pads generations with its pad_token_id
        data_collator=StockRowCollator(processor),
        compute_metrics=compute_metrics,
    )
    trainer.remove_callback(PrinterCallback)
    metrics = trainer.evaluate(**GENERATION)
    scorer.close()
    return {"seconds": float(metrics["eval_runtime"]), "images": len(rows), "rows": len(dataset)}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=384, help="Model input size (BLIP-base: 384).")
    parser.add_argument("--images", type=int, default=None, help="Evaluation images (default 10; quick 4).")
    parser.add_argument("--batch_size", type=int, default=10, help="Per-device eval batch (ours: images, stock: rows).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed evaluations of each side (median reported).")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (the project's default, 2).")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on AMX.")
    args = parser.parse_args(argv)
    threads = common.set_threads(args.threads)
    precision = common.resolve_precision(args.precision)
    hf_logging.set_verbosity_error()
    logging.getLogger("captioning").setLevel(logging.WARNING)
    dims = dict(hidden=64, layers=2, image_size=64) if args.quick else dict(image_size=args.image_size)
    num_images = args.images or (4 if args.quick else 10)
    repeats = 1 if args.quick else args.repeats

    wall = common.Stopwatch()
    timings: dict[str, list[float]] = {"ours": [], "stock": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        checkpoint = common.build_checkpoint(workdir / "blip", **dims)
        folder = workdir / "data"
        rows = eval_folder(folder, num_images)
        warm = common.Stopwatch()  # one small evaluation of each side: kernels, worker start-up, caches
        run_ours(checkpoint, folder, args, precision, workdir / "out-warmup", max_images=2)
        run_stock(checkpoint, rows[:2], args, precision, workdir / "out-warmup-stock")
        print(f"warm-up: {warm():.1f} s", flush=True)
        for repeat in range(repeats):
            ours = run_ours(checkpoint, folder, args, precision, workdir / f"out-ours-{repeat}", max_images=None)
            stock = run_stock(checkpoint, rows, args, precision, workdir / f"out-stock-{repeat}")
            assert ours["images"] == stock["images"] == num_images, (ours, stock)
            timings["ours"].append(ours["seconds"])
            timings["stock"].append(stock["seconds"])
            print(f"repeat {repeat}: ours {ours['seconds']:.2f} s, stock {stock['seconds']:.2f} s", flush=True)

    ours_s, stock_s = common.median(timings["ours"]), common.median(timings["stock"])
    output = {
        "benchmark": "eval_throughput",
        "images_per_s_ours": round(num_images / ours_s, 4),
        "images_per_s_stock_per_row": round(num_images / stock_s, 4),
        "eval_speedup_vs_per_row": round(stock_s / ours_s, 2),
        "s_per_image_ours": round(ours_s / num_images, 3),
        "s_per_image_stock_per_row": round(stock_s / num_images, 3),
        "eval_runtime_s_ours": [round(value, 2) for value in timings["ours"]],
        "eval_runtime_s_stock_per_row": [round(value, 2) for value in timings["stock"]],
        "settings": {
            "model": common.model_description(args.quick),
            "image_size": dims["image_size"],
            "images": num_images,
            "captions_per_image": common.CAPTIONS_PER_IMAGE,
            "generation": GENERATION,
            "batch_size": args.batch_size,
            "metrics_time": "included on both sides (CaptionScorer, METEOR off)",
            "loss": "included on both sides (ours: 5 pairs per image, image-grouped; stock: every row)",
            "stock_padding": "longest in batch (not 512)",
            "repeats": repeats,
            "precision": precision,
            "generation_precision": "ours: the run's precision (autocast); stock Seq2SeqTrainer: fp32 (as shipped)",
            "num_workers": args.num_workers,
            "threads": threads,
            "quick": args.quick,
            "wall_s": round(wall(), 1),
            **common.machine_info(),
        },
    }
    common.emit(output, args.json_out)
    return output


if __name__ == "__main__":
    main()
