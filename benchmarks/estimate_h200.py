#!/usr/bin/env python
"""The arithmetic behind the seed-004 estimate in benchmarks/README.md: FLOPs per caption-sample of BLIP-base
(ViT-B/16 at 384 px + BERT-base decoder with cross-attention, LoRA on the text decoder) counted from its
dimensions, turned into seconds on one H200 at an assumed utilisation, plus evaluation and data-loading terms, for
three pipelines: seed-style (the vision tower per caption row, captions padded to 512, evaluation per row), ours
grouped (the vision tower once per image per epoch) and ours on the feature cache (once per image per run).

    .venv/bin/python benchmarks/estimate_h200.py                       # defaults: seed-004 on one H200
    .venv/bin/python benchmarks/estimate_h200.py --data_ms_per_row 0.84  # CPU ms per grouped row, measured here

Pure arithmetic (no model is built); every assumption is a flag and is echoed in the JSON line.
"""

from __future__ import annotations

import argparse
import json
import math

# BLIP-base dimensions (Salesforce/blip-image-captioning-base): ViT-B/16 and a BERT-base decoder, vocab 30524.
D, LAYERS, D_FF, VOCAB, PATCH = 768, 12, 3072, 30524, 16


def image_tokens(image_size: int) -> int:
    return (image_size // PATCH) ** 2 + 1


def vision_forward(image_size: int) -> float:
    """Patch embedding + 12 ViT layers (QKV/out projections, MLP, attention scores)."""
    n = image_tokens(image_size)
    patches = 2 * (n - 1) * 3 * PATCH * PATCH * D
    per_layer = 2 * n * (4 * D * D + 2 * D * D_FF) + 4 * n * n * D
    return patches + LAYERS * per_layer


def text_parts(tokens: int, image_size: int) -> dict[str, float]:
    """Forward FLOPs of one caption row in the decoder, split by where they go."""
    n = image_tokens(image_size)
    return {
        # self-attention q/k/v/o, cross-attention q/o, MLP: on the caption tokens
        "token_linear": LAYERS * 2 * tokens * (6 * D * D + 2 * D * D_FF),
        "lm_head": 2 * tokens * (D * D + D * VOCAB),  # prediction-head transform + vocabulary projection
        "cross_kv": LAYERS * 4 * n * D * D,  # cross-attention key/value over the image tokens, per caption row
        "scores": LAYERS * (4 * tokens * tokens * D + 4 * tokens * n * D),  # self + cross attention scores
    }


def text_train(tokens: int, image_size: int) -> float:
    """Forward + backward of one caption row with LoRA: the frozen base needs activation gradients only (about one
    more pass of the caption-token matmuls, two of the attention scores); no gradient reaches the frozen image
    features, so the cross-attention key/value projection has no backward (LoRA's rank-16 terms are negligible)."""
    p = text_parts(tokens, image_size)
    forward = sum(p.values())
    backward = p["token_linear"] + p["lm_head"] + 2 * p["scores"]
    return forward + backward


def generation(image_size: int, beams: int, new_tokens: int) -> float:
    """One image: vision once, cross-attention key/value for every beam (computed once, then cached), and per beam
    per step one token through the decoder (self-attention over the prefix, on average half the new tokens)."""
    one = text_parts(1, image_size)
    per_token = one["token_linear"] + one["lm_head"] + one["scores"] + LAYERS * 4 * (new_tokens / 2) * D
    return vision_forward(image_size) + beams * one["cross_kv"] + beams * new_tokens * per_token


def text_train_grouped(tokens: int, image_size: int, captions_per_image: int, cross_kv_once: bool) -> float:
    """One caption row of an image-grouped batch: with ``cross_kv_once`` (captioning/grouping.py once_per_image)
    the cross-attention key/value projection runs once per image, shared by its captions."""
    shared = text_parts(tokens, image_size)["cross_kv"] * (1 - 1 / captions_per_image) if cross_kv_once else 0.0
    return text_train(tokens, image_size) - shared


# Seed 004 (benchmarks/README.md): BLIP-base at 384 px on Flickr8k (6,000 training, 1,000 validation and 1,000 test
# images, 5 captions each), 5 epochs, configs/blip_base_lora.yaml; the reference run took 1,067 s on one H200.
SEED004 = dict(
    train_images=6000,
    eval_images=1000,
    captions_per_image=5,
    epochs=5,
    eval_passes=8,  # baseline + 5 epochs + final evaluation on validation, predict on test
    test_passes=1,
    eval_batch=128,
    workers=8,
    reference_s=1067.0,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--caption_tokens", type=int, default=20, help="Decoder positions per row ([DEC] + caption).")
    parser.add_argument("--seed_style_tokens", type=int, default=512)
    parser.add_argument("--captions_per_image", type=int, default=SEED004["captions_per_image"])
    parser.add_argument("--train_images", type=int, default=SEED004["train_images"])
    parser.add_argument("--epochs", type=int, default=SEED004["epochs"])
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="H200 dense bf16 peak.")
    parser.add_argument("--fp32_peak_tflops", type=float, default=67.0, help="H200 fp32 (non-tensor-core) peak.")
    parser.add_argument("--utilisation", type=float, default=0.35)
    parser.add_argument(
        "--cross_kv_once_per_image",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Grouped batches (ours, with or without the feature cache) project BLIP's cross-attention keys/values "
        "once per image (captioning/grouping.py once_per_image); --no-cross_kv_once_per_image: once per caption row, "
        "as before that change (the earlier 71 s).",
    )
    parser.add_argument(
        "--eval_images", type=int, default=SEED004["eval_images"], help="Images per validation/test split."
    )
    parser.add_argument(
        "--eval_passes",
        type=int,
        default=SEED004["eval_passes"],
        help="configs/blip_base_lora.yaml: baseline + 5 epochs + final eval on validation, predict on test.",
    )
    parser.add_argument(
        "--test_passes",
        type=int,
        default=SEED004["test_passes"],
        help="Of --eval_passes, those on test images (predict): the feature cache holds training and validation "
        "images only, so these run the vision tower.",
    )
    parser.add_argument("--eval_batch", type=int, default=SEED004["eval_batch"])
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--decode_step_ms", type=float, default=15.0, help="Assumed host overhead per beam step.")
    parser.add_argument("--hbm_tb_s", type=float, default=4.0, help="Achieved HBM bandwidth (H200 peak 4.8 TB/s).")
    parser.add_argument(
        "--data_ms_per_row",
        type=float,
        default=0.84,
        help="CPU ms per grouped training row read from the preprocessed cache (train_throughput.py, measured here).",
    )
    parser.add_argument(
        "--seed_style_data_ms_per_row",
        type=float,
        default=7.2,
        help="CPU ms per seed-style row: JPEG decode + processor + padding to 512 (train_throughput.py, measured).",
    )
    parser.add_argument(
        "--preprocess_ms_per_image",
        type=float,
        default=6.0,
        help="CPU ms per image, once: the scan's decode (~1.8) + decode and resize into the cache (~4.2), measured.",
    )
    parser.add_argument(
        "--feature_data_ms_per_row",
        type=float,
        default=0.44,
        help="CPU ms per grouped training row read from the feature cache (bf16 577x768 per image, batches of 128 "
        "rows, one thread as in a DataLoader worker; measured here).",
    )
    parser.add_argument(
        "--feature_pass_ms_per_image",
        type=float,
        default=1.7,
        help="CPU ms per image of the one-time feature pass's input: read the preprocessed pixels and normalise "
        "them (one thread, measured here). DataLoader workers (--workers) prepare them while the GPU computes.",
    )
    parser.add_argument(
        "--feature_bytes_per_value", type=int, default=2, help="The store's dtype: the run's bf16 (fp32: 4)."
    )
    parser.add_argument(
        "--feature_write_gb_s",
        type=float,
        default=2.0,
        help="Assumed disk write rate of the feature store (its memory-mapped file is flushed at the end).",
    )
    parser.add_argument(
        "--h2d_gb_s",
        type=float,
        default=20.0,
        help="Assumed host-to-GPU copy rate of batches of cached features (PCIe 5 x16 peaks at ~64 GB/s); the "
        "Trainer copies each batch before its step, so this time adds to the step.",
    )
    parser.add_argument("--workers", type=int, default=SEED004["workers"], help="dataloader_num_workers of the config.")
    parser.add_argument("--fixed_s", type=float, default=10.0, help="Model load, worker start-ups, saves (assumed).")
    parser.add_argument(
        "--reference_s", type=float, default=SEED004["reference_s"], help="The seed-004 reference run, measured."
    )
    parser.add_argument("--feature_cache_target_s", type=float, default=40.0, help="The paper target of that path.")
    return parser


def evaluation_s(
    args,
    images: int,
    flops_bf16: float,
    flops_fp32: float = 0.0,
    rows_per_image: int = 1,
    value_bytes: int = 2,
    copy_bytes: float = 0.0,
) -> float:
    """Seconds for ``images`` image-evaluations (in passes over ``--eval_images``): ``flops_*`` per image at the
    bf16 / fp32 rate, ``rows_per_image`` generated sequences per image (5: the stock per-row evaluation),
    transformers' reorder of the cross-attention cache in every beam step (``value_bytes`` per value), the host
    overhead per beam step, and ``copy_bytes`` per image copied to the GPU."""
    rate = args.peak_tflops * 1e12 * args.utilisation
    fp32_rate = args.fp32_peak_tflops * 1e12 * args.utilisation
    passes = images / args.eval_images
    rows = args.eval_images * rows_per_image
    steps = passes * math.ceil(rows / args.eval_batch) * args.new_tokens
    sequences = min(args.eval_batch, rows) * args.beams
    cache_values = LAYERS * 2 * image_tokens(args.image_size) * D * sequences  # cross-attention keys and values
    reorder_s = steps * 2 * cache_values * value_bytes / (args.hbm_tb_s * 1e12)  # read + write
    compute_s = images * (flops_bf16 / rate + flops_fp32 / fp32_rate)
    return compute_s + reorder_s + steps * args.decode_step_ms / 1000 + images * copy_bytes / (args.h2d_gb_s * 1e9)


def estimate(args) -> dict:
    """The estimate of ``args`` (build_parser's flags) as the JSON line's dict."""
    g = 1e9
    size, c = args.image_size, args.captions_per_image
    vision = vision_forward(size)
    text = text_train(args.caption_tokens, size)
    text_grouped = text_train_grouped(args.caption_tokens, size, c, args.cross_kv_once_per_image)
    grouped = vision / c + text_grouped
    ungrouped = vision + text
    seed_style = vision + text_train(args.seed_style_tokens, size)
    samples = args.train_images * c * args.epochs
    rate = args.peak_tflops * 1e12 * args.utilisation
    train_gpu_s = samples * grouped / rate
    train_data_s = samples * args.data_ms_per_row / 1000 / args.workers
    all_images = args.train_images + 2 * args.eval_images
    preprocess_s = all_images * args.preprocess_ms_per_image / 1000 / args.workers

    # Evaluation, ours: one generation per image (bf16) + the loss of its c pairs, image-grouped.
    parts = text_parts(args.caption_tokens, size)
    shared_kv = (c - 1) * parts["cross_kv"] if args.cross_kv_once_per_image else 0.0
    eval_count = args.eval_images * args.eval_passes
    gen = generation(size, args.beams, args.new_tokens)
    loss = vision + c * sum(parts.values()) - shared_kv
    eval_bf16_s = evaluation_s(args, eval_count, gen + loss)
    eval_fp32_gen_s = evaluation_s(args, eval_count, loss, gen, value_bytes=4)

    # Seed-style: stock Seq2SeqTrainer per caption row (generation in fp32 as shipped, every row's loss).
    seed_train_gpu_s = samples * seed_style / rate
    seed_train_data_s = samples * args.seed_style_data_ms_per_row / 1000 / args.workers
    row_loss = vision + sum(parts.values())
    seed_eval_s = evaluation_s(args, eval_count, c * row_loss, c * gen, rows_per_image=c, value_bytes=4)

    # Feature cache: the vision tower once per training and validation image per run, in one pass before training
    # (DataLoader workers prepare the pixels while the main process computes and writes); steps and evaluation read
    # the features instead.
    feature_bytes = image_tokens(size) * D * args.feature_bytes_per_value
    cached_images = args.train_images + args.eval_images
    feature_pass_s = cached_images * max(
        args.feature_pass_ms_per_image / 1000 / args.workers,
        vision / rate + feature_bytes / (args.feature_write_gb_s * 1e9),
    )
    feature_copy_s = args.train_images * args.epochs * feature_bytes / (args.h2d_gb_s * 1e9)
    feature_train_gpu_s = samples * text_grouped / rate + feature_copy_s
    feature_train_data_s = samples * args.feature_data_ms_per_row / 1000 / args.workers
    validation_count = args.eval_images * (args.eval_passes - args.test_passes)
    feature_eval_s = evaluation_s(args, validation_count, gen - vision + loss - vision, copy_bytes=feature_bytes)
    feature_eval_s += evaluation_s(args, eval_count - validation_count, gen + loss)

    paths = {
        "seed_style": {
            "train_s": max(seed_train_gpu_s, seed_train_data_s),
            "eval_s": seed_eval_s,
            "fixed_s": args.fixed_s,
        },
        "grouped": {
            "preprocess_s": preprocess_s,
            "train_s": max(train_gpu_s, train_data_s),
            "eval_s": eval_bf16_s,
            "fixed_s": args.fixed_s,
        },
        "feature_cache": {
            "preprocess_s": preprocess_s,
            "feature_pass_s": feature_pass_s,
            "train_s": max(feature_train_gpu_s, feature_train_data_s),
            "eval_s": feature_eval_s,
            "fixed_s": args.fixed_s,
        },
    }
    totals = {path: sum(terms.values()) for path, terms in paths.items()}

    return {
        "gflop_vision_forward": round(vision / g, 1),
        "gflop_text_train_per_row": round(text / g, 1),
        "gflop_text_train_per_row_grouped": round(text_grouped / g, 1),
        "gflop_text_parts_forward": {k: round(v / g, 2) for k, v in parts.items()},
        "gflop_per_sample_grouped": round(grouped / g, 1),
        "gflop_per_sample_ungrouped": round(ungrouped / g, 1),
        "gflop_per_sample_seed_style": round(seed_style / g, 1),
        "gflop_per_sample_feature_cache": round(text_grouped / g, 1),
        "caption_samples": samples,
        "samples_per_s_grouped": round(rate / grouped),
        "samples_per_s_seed_style": round(rate / seed_style),
        "samples_per_s_feature_cache": round(rate / text_grouped),
        "train_s_gpu_grouped": round(train_gpu_s, 1),
        "train_s_gpu_seed_style": round(seed_train_gpu_s, 1),
        "train_s_gpu_feature_cache": round(feature_train_gpu_s, 1),
        "train_s_data_loading": round(train_data_s, 1),
        "train_s_data_loading_seed_style": round(seed_train_data_s, 1),
        "train_s_data_loading_feature_cache": round(feature_train_data_s, 1),
        "preprocess_s_once": round(preprocess_s, 1),
        "feature_pass_s_once": round(feature_pass_s, 1),
        "feature_cache_bytes_per_image": feature_bytes,
        "feature_cache_gb": round(cached_images * feature_bytes / 1e9, 2),
        "gflop_eval_per_image": {"generation": round(gen / g, 1), "loss_5_pairs_grouped": round(loss / g, 1)},
        "eval_images_total": eval_count,
        "eval_s": round(eval_bf16_s, 1),
        "eval_s_if_generation_were_fp32": round(eval_fp32_gen_s, 1),
        "eval_s_seed_style": round(seed_eval_s, 1),
        "eval_s_feature_cache": round(feature_eval_s, 1),
        "total_s": round(totals["grouped"], 1),
        "seed004_s_seed_style": round(totals["seed_style"], 1),
        "seed004_s_grouped": round(totals["grouped"], 1),
        "seed004_s_feature_cache": round(totals["feature_cache"], 1),
        "seed004_s_reference": args.reference_s,
        "feature_cache_meets_target": totals["feature_cache"] <= args.feature_cache_target_s,
        "seed004_parts_s": {path: {k: round(v, 1) for k, v in terms.items()} for path, terms in paths.items()},
        "assumptions": vars(args),
    }


def main(argv=None) -> dict:
    result = estimate(build_parser().parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
