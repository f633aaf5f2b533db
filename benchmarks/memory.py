#!/usr/bin/env python
"""Peak memory of loading the BLIP-base-shaped captioner and one LoRA training step: fp32 vs 8-bit weights; and the
disk the image-feature cache takes per image for BLIP-base and BLIP-2 OPT-2.7b.

The random-weight base is saved once with ``save_pretrained``; each mode then runs in a fresh subprocess that loads
it from disk through the project's ``load_model`` (``LoraArguments(load_in_8bit=...)``, LoRA r 16 on the text
decoder's query/value) and takes one training step on one image with its 5 captions, exactly as
``CaptioningTrainer.compute_loss`` does it (CaptionCollator(group_images=True) + expand_image_features), then
AdamW. Reported per mode: the process's peak RSS (``ru_maxrss``, what the OS had to give it, file-backed
pages of the memory-mapped safetensors included), the peak of its anonymous RSS (sampled every 5 ms from
/proc/self/status: the memory it allocated itself), and on a GPU ``torch.cuda.max_memory_allocated``.

The feature cache (``--cache_image_features``, captioning/feature_cache.py) keeps one tensor per image in the run's
precision: BLIP's vision-tower output (patch tokens + 1, vision width) and BLIP-2's language projection of its query
tokens (query tokens, language-model width). Bytes per image and for Flickr8k's 8,091 images are computed from the
configs (BLIP-base as built here; BLIP-2 OPT-2.7b from a Blip2Config of its published sizes, nothing downloaded),
and each shape is checked against a real forward: this run's BLIP checkpoint, and a BLIP-2 whose image side is
shrunk but whose query tokens and language-model width are OPT-2.7b's.

    .venv/bin/python benchmarks/memory.py            # full run (30-70 s on 2 CPU cores)
    .venv/bin/python benchmarks/memory.py --quick    # smoke run (tiny model)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipForConditionalGeneration

MODES = ("fp32", "8bit")
FEATURE_PRECISIONS = {"bf16": 2, "fp32": 4}  # bytes per stored value (fp16 as bf16)


class AnonRssSampler:
    """Peak of RssAnon (private, allocated memory; excludes file pages of mmapped weights) sampled in a thread."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def sample(self) -> int:
        value = self.current_kib()
        self.peak_kib = max(self.peak_kib, value)
        return value

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def child(mode: str, checkpoint: str, image: str, captions: list[str]) -> dict:
    """One mode, in its own process: load, one training step, report."""
    from captioning.families import BLIP
    from captioning.grouping import expand_image_features
    from captioning.modeling import image_feature_module
    from collators import CaptionCollator, build_layout

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    result = {"mode": mode}
    with AnonRssSampler() as sampler:
        result["rss_anon_mb_before_load"] = sampler.sample() / 1024
        result["peak_rss_mb_before_load"] = common.peak_rss_mb()
        model, processor = common.load_lora_model(checkpoint, load_in_8bit=mode == "8bit")
        if cuda and mode == "fp32":
            model.to("cuda")  # load_model places k-bit weights on the GPU itself
        result["rss_anon_mb_after_load"] = sampler.sample() / 1024
        result["peak_rss_mb_after_load"] = common.peak_rss_mb()
        if cuda:
            result["cuda_mb_after_load"] = torch.cuda.memory_allocated() / 2**20

        layout = build_layout(BLIP, model.config, processor.tokenizer)
        collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, 64, group_images=True)
        picture = Image.open(image).convert("RGB")
        batch = collator([{"image": picture, "caption": caption, "image_index": 0} for caption in captions])
        device = next(p for p in model.parameters() if p.requires_grad).device
        batch = {key: value.to(device) for key, value in batch.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
        model.train()
        started = time.perf_counter()
        with expand_image_features(image_feature_module(model, BLIP), batch.pop("image_group")):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["step_s"] = time.perf_counter() - started
        result["loss"] = float(loss)
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["peak_rss_anon_mb"] = sampler.peak_kib / 1024
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    result["rows"] = len(captions)
    return result


def blip2_opt_2_7b_config() -> Blip2Config:
    """Salesforce/blip2-opt-2.7b's sizes: ViT-g/14 at 224 px (1408 wide, 39 layers), a 12-layer Q-Former with 32
    query tokens, OPT-2.7b (2560 wide, 32 layers, vocabulary 50272). A config only: no weights."""
    return Blip2Config(
        vision_config=dict(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224
        ),
        qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, encoder_hidden_size=1408),
        text_config=dict(
            model_type="opt",
            hidden_size=2560,
            ffn_dim=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            word_embed_proj_dim=2560,
            vocab_size=50272,
            max_position_embeddings=2048,
        ),
        num_query_tokens=32,
    )


def blip2_feature_shape(config: Blip2Config) -> tuple[int, int]:
    """What --cache_image_features stores per image for BLIP-2: the language projection of the Q-Former's query
    tokens (query tokens, language-model width)."""
    return (config.num_query_tokens, config.text_config.hidden_size)


def check_blip_shape(checkpoint: Path) -> tuple[tuple[int, ...], tuple[int, int]]:
    """One image's vision-tower output from the saved checkpoint (what the BLIP store keeps): its shape measured by
    a forward, and computed from the checkpoint's config."""
    model = BlipForConditionalGeneration.from_pretrained(checkpoint)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        output = model.vision_model(pixel_values=torch.zeros(1, 3, size, size))
    return tuple(output.last_hidden_state.shape[1:]), common.blip_feature_shape(model.config)


def measured_blip2_shape(config: Blip2Config) -> tuple[int, ...]:
    """The shape of one image's language projection (what the BLIP-2 store keeps) from a forward of a BLIP-2 with
    ``config``'s query tokens and language-model width, its vision tower and Q-Former shrunk and its language model
    cut to one layer (a ~30M-parameter build instead of 3.9B)."""
    from captioning.families import BLIP2_OPT
    from captioning.modeling import image_feature_module

    text = config.text_config
    small = Blip2Config(
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28
        ),
        qformer_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=64
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=text.hidden_size,
            word_embed_proj_dim=text.word_embed_proj_dim,
            num_attention_heads=text.num_attention_heads,
            num_hidden_layers=1,
            ffn_dim=64,
            vocab_size=64,
            max_position_embeddings=64,
        ),
        num_query_tokens=config.num_query_tokens,
    )
    model = Blip2ForConditionalGeneration(small).eval()
    shapes = []
    module = image_feature_module(model, BLIP2_OPT)  # the language projection
    handle = module.register_forward_hook(lambda _module, _args, output: shapes.append(tuple(output.shape[1:])))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=torch.zeros(1, 3, 28, 28))
    finally:
        handle.remove()
    return shapes[0]


def feature_cache_sizes(checkpoint: Path, image_size: int, quick: bool) -> dict:
    """Bytes per image of the feature cache for BLIP-base and BLIP-2 OPT-2.7b in bf16 and fp32, the totals for
    Flickr8k's 8,091 images, and the shapes checked against real forwards."""
    shapes = {
        "blip_base": common.blip_feature_shape(common.blip_config(common.build_tokenizer(), image_size=image_size)),
        "blip2_opt": blip2_feature_shape(blip2_opt_2_7b_config()),
    }
    output = {f"feature_cache_shape_{model}": list(shape) for model, shape in shapes.items()}
    for model, shape in shapes.items():
        for precision, value_bytes in FEATURE_PRECISIONS.items():
            per_image = shape[0] * shape[1] * value_bytes
            output[f"feature_cache_bytes_per_image_{model}_{precision}"] = per_image
            output[f"feature_cache_gib_flickr8k_{model}_{precision}"] = round(
                per_image * common.FLICKR8K_IMAGES / 2**30, 2
            )
    # The forwards: this run's checkpoint (BLIP-base dims, or the tiny model with --quick) and a BLIP-2 of
    # OPT-2.7b's output sizes.
    checked = {
        "blip_tiny" if quick else "blip_base": check_blip_shape(checkpoint),
        "blip2_opt": (measured_blip2_shape(blip2_opt_2_7b_config()), shapes["blip2_opt"]),
    }
    output["feature_cache_shape_measured"] = {model: list(measured) for model, (measured, _) in checked.items()}
    output["feature_cache_shapes_match_config"] = all(measured == shape for measured, shape in checked.values())
    return output


def run_child(mode: str, checkpoint: Path, row: dict, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--checkpoint", str(checkpoint)]
    command += ["--image", row["image"], "--captions_json", json.dumps(row["references"])]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise RuntimeError(f"memory child {mode} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=384, help="Model input size (BLIP-base: 384).")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse_hidden())
    parser.add_argument("--checkpoint", default=None, help=argparse_hidden())
    parser.add_argument("--image", default=None, help=argparse_hidden())
    parser.add_argument("--captions_json", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    threads = common.set_threads(args.threads)
    if args.child:
        common.emit(child(args.child, args.checkpoint, args.image, json.loads(args.captions_json)), None)
        return {}

    dims = dict(hidden=64, layers=2, image_size=64) if args.quick else dict(image_size=args.image_size)
    wall = common.Stopwatch()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        checkpoint = common.build_checkpoint(workdir / "blip", **dims)
        row = common.make_image_folder(workdir / "images", 1)[0]
        results = {mode: run_child(mode, checkpoint, row, args) for mode in MODES}
        checkpoint_mb = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors")) / 2**20
        features = feature_cache_sizes(checkpoint, args.image_size, args.quick)
    for mode in MODES:
        print(f"{mode}: {results[mode]}", flush=True)

    fp32, int8 = results["fp32"], results["8bit"]
    output = {
        "benchmark": "memory",
        "peak_mb_fp32": round(fp32["peak_rss_mb"], 1),
        "peak_mb_8bit": round(int8["peak_rss_mb"], 1),
        "peak_ratio_8bit_over_fp32": round(int8["peak_rss_mb"] / fp32["peak_rss_mb"], 3),
        "peak_anon_mb_fp32": round(fp32["peak_rss_anon_mb"], 1),
        "peak_anon_mb_8bit": round(int8["peak_rss_anon_mb"], 1),
        "peak_anon_ratio_8bit_over_fp32": round(int8["peak_rss_anon_mb"] / fp32["peak_rss_anon_mb"], 3),
        "rss_anon_mb_after_load_fp32": round(fp32["rss_anon_mb_after_load"], 1),
        "rss_anon_mb_after_load_8bit": round(int8["rss_anon_mb_after_load"], 1),
        "rss_anon_mb_before_load": round(fp32["rss_anon_mb_before_load"], 1),
        "peak_mb_before_load": round(fp32["peak_rss_mb_before_load"], 1),
        "weights_mb_fp32": round(fp32["weights_mb"], 1),
        "weights_mb_8bit": round(int8["weights_mb"], 1),
        "step_s_fp32": round(fp32["step_s"], 2),
        "step_s_8bit": round(int8["step_s"], 2),
    }
    if "peak_cuda_mb" in fp32:
        output["peak_cuda_mb_fp32"] = round(fp32["peak_cuda_mb"], 1)
        output["peak_cuda_mb_8bit"] = round(int8["peak_cuda_mb"], 1)
        output["peak_cuda_ratio_8bit_over_fp32"] = round(int8["peak_cuda_mb"] / fp32["peak_cuda_mb"], 3)
    output.update(features)
    output["settings"] = {
        "model": common.model_description(args.quick),
        "image_size": dims["image_size"],
        "checkpoint_mb": round(checkpoint_mb, 1),
        "step": "1 image x 5 captions, image-grouped, fp32 compute, AdamW on LoRA r 16 query/value",
        "feature_cache": "BLIP-base at --image_size and BLIP-2 OPT-2.7b (224 px, 32 query tokens) from their configs; "
        f"totals for {common.FLICKR8K_IMAGES} images; bf16 = fp16 = 2 bytes per value, fp32 = 4",
        "threads": threads,
        "quick": args.quick,
        "wall_s": round(wall(), 1),
        **common.machine_info(),
    }
    common.emit(output, args.json_out)
    return output


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
