#!/usr/bin/env python
"""The arithmetic behind the seed-004 estimate in benchmarks/README.md: FLOPs per caption-sample of BLIP-base
(ViT-B/16 at 384 px + BERT-base decoder with cross-attention, LoRA on the text decoder) counted from its
dimensions, turned into seconds on one H200 at an assumed utilisation, plus evaluation and data-loading terms.

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--caption_tokens", type=int, default=20, help="Decoder positions per row ([DEC] + caption).")
    parser.add_argument("--seed_style_tokens", type=int, default=512)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--train_images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="H200 dense bf16 peak.")
    parser.add_argument("--fp32_peak_tflops", type=float, default=67.0, help="H200 fp32 (non-tensor-core) peak.")
    parser.add_argument("--utilisation", type=float, default=0.35)
    parser.add_argument("--eval_images", type=int, default=1000, help="Images per validation/test split.")
    parser.add_argument(
        "--eval_passes",
        type=int,
        default=8,
        help="configs/blip_base_lora.yaml: baseline + 5 epochs + final eval on validation, predict on test.",
    )
    parser.add_argument("--eval_batch", type=int, default=128)
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
        "--preprocess_ms_per_image",
        type=float,
        default=6.0,
        help="CPU ms per image, once: the scan's decode (~1.8) + decode and resize into the cache (~4.2), measured.",
    )
    parser.add_argument("--workers", type=int, default=8, help="dataloader_num_workers of the config.")
    parser.add_argument("--fixed_s", type=float, default=10.0, help="Model load, worker start-ups, saves (assumed).")
    args = parser.parse_args(argv)

    g = 1e9
    size, c = args.image_size, args.captions_per_image
    vision = vision_forward(size)
    text = text_train(args.caption_tokens, size)
    grouped = vision / c + text
    ungrouped = vision + text
    seed_style = vision + text_train(args.seed_style_tokens, size)
    samples = args.train_images * c * args.epochs
    rate = args.peak_tflops * 1e12 * args.utilisation
    fp32_rate = args.fp32_peak_tflops * 1e12 * args.utilisation
    train_gpu_s = samples * grouped / rate
    train_data_s = samples * args.data_ms_per_row / 1000 / args.workers
    all_images = args.train_images + 2 * args.eval_images
    preprocess_s = all_images * args.preprocess_ms_per_image / 1000 / args.workers

    eval_count = args.eval_images * args.eval_passes
    gen = generation(size, args.beams, args.new_tokens)
    loss = vision + c * sum(text_parts(args.caption_tokens, size).values())
    steps = args.eval_passes * math.ceil(args.eval_images / args.eval_batch) * args.new_tokens
    sequences = min(args.eval_batch, args.eval_images) * args.beams
    cache_bytes = LAYERS * 2 * image_tokens(size) * D * sequences  # cross-attention cache, times bytes per value
    reorder_bf16_s = steps * 2 * cache_bytes * 2 / (args.hbm_tb_s * 1e12)  # read + write, 2 bytes
    eval_overhead_s = steps * args.decode_step_ms / 1000
    eval_bf16_s = eval_count * (gen + loss) / rate + reorder_bf16_s + eval_overhead_s
    eval_fp32_gen_s = eval_count * gen / fp32_rate + eval_count * loss / rate + 2 * reorder_bf16_s + eval_overhead_s

    result = {
        "gflop_vision_forward": round(vision / g, 1),
        "gflop_text_train_per_row": round(text / g, 1),
        "gflop_text_parts_forward": {k: round(v / g, 2) for k, v in text_parts(args.caption_tokens, size).items()},
        "gflop_per_sample_grouped": round(grouped / g, 1),
        "gflop_per_sample_ungrouped": round(ungrouped / g, 1),
        "gflop_per_sample_seed_style": round(seed_style / g, 1),
        "caption_samples": samples,
        "samples_per_s_grouped": round(rate / grouped),
        "samples_per_s_seed_style": round(rate / seed_style),
        "train_s_gpu_grouped": round(train_gpu_s, 1),
        "train_s_gpu_seed_style": round(samples * seed_style / rate, 1),
        "train_s_data_loading": round(train_data_s, 1),
        "preprocess_s_once": round(preprocess_s, 1),
        "gflop_eval_per_image": {"generation": round(gen / g, 1), "loss_5_pairs_grouped": round(loss / g, 1)},
        "eval_images_total": eval_count,
        "eval_s": round(eval_bf16_s, 1),
        "eval_s_if_generation_were_fp32": round(eval_fp32_gen_s, 1),
        "total_s": round(preprocess_s + max(train_gpu_s, train_data_s) + eval_bf16_s + args.fixed_s, 1),
        "assumptions": vars(args),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
