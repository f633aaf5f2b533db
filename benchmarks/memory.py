#!/usr/bin/env python
"""Peak memory of loading the BLIP-base-shaped captioner and one LoRA training step: fp32 vs 8-bit weights.

The random-weight base is saved once with ``save_pretrained``; each mode then runs in a fresh subprocess that loads
it from disk through the project's ``load_model`` (``LoraArguments(load_in_8bit=...)``, LoRA r 16 on the text
decoder's query/value) and takes one training step on one image with its 5 captions, exactly as
``CaptioningTrainer.compute_loss`` does it (CaptionCollator(group_images=True) + expand_image_features), then
AdamW. Reported per mode: the process's peak RSS (``ru_maxrss``, what the OS had to give it, file-backed
pages of the memory-mapped safetensors included), the peak of its anonymous RSS (sampled every 5 ms from
/proc/self/status: the memory it allocated itself), and on a GPU ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/memory.py            # full run (20-45 s on 2 CPU cores)
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

MODES = ("fp32", "8bit")


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
    output["settings"] = {
        "model": common.model_description(args.quick),
        "image_size": dims["image_size"],
        "checkpoint_mb": round(checkpoint_mb, 1),
        "step": "1 image x 5 captions, image-grouped, fp32 compute, AdamW on LoRA r 16 query/value",
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
