#!/usr/bin/env python
"""Preprocessing throughput at real size: images/s of ``build_image_cache`` (decode + EXIF + the processor's resize
into the uint8 cache) with 1 worker (in the main process) and with N worker processes, pool start included.

    .venv/bin/python benchmarks/preprocess_throughput.py            # 400 photo-like 500x375 JPEGs -> 384 px
    .venv/bin/python benchmarks/preprocess_throughput.py --quick    # 40 images, smoke run

Before timing, the parent runs a full-size resize itself (as a training process has before it builds the cache):
the case that deadlocked forked workers. Prints one JSON line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    Stopwatch,
    base_parser,
    emit,
    machine_info,
    make_image_folder,
    per_image_dataset,
    set_threads,
)

from captioning.image_cache import build_image_cache
from captioning.tiny_models import tiny_image_processor


def measure(split, processor, root: Path, workers: int) -> float:
    clock = Stopwatch()
    build_image_cache(split, processor, root=root, num_workers=workers, show_progress=False)
    return len(split) / clock()


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--image_size", type=int, default=384, help="The model's input size (BLIP-base: 384).")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of the parallel run (default: 2).")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    num_images = 40 if args.quick else args.num_images
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        workdir = Path(workdir)
        split = per_image_dataset(make_image_folder(workdir / "images", num_images))
        processor = tiny_image_processor(args.image_size)
        warm = build_image_cache(split.select(range(4)), processor, root=workdir / "warm", num_workers=0)
        assert len(warm) == 4  # the parent has now run torch's resize on full-size photos
        one = measure(split, processor, workdir / "one", workers=1)
        parallel = measure(split, processor, workdir / "parallel", workers=args.workers)
    emit(
        {
            "benchmark": "preprocess_throughput",
            "images": num_images,
            "source_size": "500x375 JPEG q90",
            "image_size": args.image_size,
            "torch_threads_main_process": threads,
            "images_per_s_1_worker": round(one, 1),
            f"images_per_s_{args.workers}_workers": round(parallel, 1),
            "parallel_speedup": round(parallel / one, 2),
            **machine_info(),
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
