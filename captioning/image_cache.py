"""Preprocess once: every image decoded and resized to the model's input size a single time, kept as uint8.

Later epochs (and every evaluation) read the resized pixels from a memory-mapped file instead of decoding JPEGs
again; the image processor then only rescales and normalises them, which gives the same ``pixel_values`` as
processing the original image (resize output is uint8, tested). The cache is keyed by the split's fingerprint and
the processor's settings, so another run on the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub import constants
from tqdm.auto import tqdm

from captioning.images import load_image
from captioning.workers import process_pool

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
CHUNK = 64  # images per worker task, at most
MIN_FREE_FRACTION = 0.2  # of the disk's free space, left free by a new cache
STAGING_MARK = ".tmp-"  # <key>.tmp-<host>-<pid>: a cache being built
STALE_STAGING_HOURS = 24  # a staging folder unchanged this long is an interrupted build's, whatever its owner


def default_cache_root() -> Path:
    return Path(constants.HF_HOME) / "captioning-image-cache"


class ImageCache:
    """Read-only uint8 pixels (N, 3, H, W) of one split; ``cache[i]`` is a tensor view of row ``i``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.shape = tuple(meta["shape"])
        self._array = None

    def _pixels(self) -> np.memmap:
        if self._array is None:  # opened lazily, so the object pickles cheaply into DataLoader workers
            self._array = np.memmap(self.folder / "pixels.uint8", dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __getstate__(self):
        return {"folder": self.folder, "shape": self.shape, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._pixels()[index]))


def cache_key(split: datasets.Dataset, image_processor) -> str:
    """Same images (by path and modification time, or by the dataset's fingerprint when the images are stored in
    it) and same resize settings: same key."""
    settings = image_processor.to_dict()
    relevant = {key: settings.get(key) for key in ("size", "resample", "do_resize", "crop_size", "do_center_crop")}
    digest = hashlib.sha256(
        json.dumps([CACHE_VERSION, type(image_processor).__name__, relevant], sort_keys=True, default=str).encode()
    )
    feature = split.features["image"]
    if isinstance(feature, datasets.Value):  # local files: their paths and modification times
        for path in split.select_columns(["image"])[:]["image"]:
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError:
                stamp = -1
            digest.update(f"{path}\0{stamp}\n".encode())
    else:  # images inside the dataset (Hub, shards): the fingerprint datasets derives from its cache files
        digest.update(split._fingerprint.encode())
    return digest.hexdigest()[:24]


def build_image_cache(
    split: datasets.Dataset,
    image_processor,
    *,
    root: str | Path | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
    description: str = "images",
) -> ImageCache:
    """Resize every image of ``split`` once (in ``num_workers`` processes) into a memory-mapped uint8 file; an
    existing complete cache of the same data and processor settings is reused."""
    folder = Path(root or default_cache_root()) / cache_key(split, image_processor)
    if (folder / "meta.json").is_file():
        logger.info("Reusing preprocessed %s in %s", description, folder)
        return ImageCache(folder)
    sample = _resize([load_image(split[0]["image"])], image_processor)[0]
    shape = (len(split), *sample.shape)
    needed = int(np.prod(shape))
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    check_free_space(needed, folder.parent, f"{len(split)} {description}")
    staging = folder.with_name(f"{folder.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        _fill_staging(staging, shape, split, image_processor, num_workers, show_progress, description)
        os.replace(staging, folder)  # complete caches appear whole
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        # a concurrent builder's complete copy is already in place: it wins
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an error, or when the other copy won: never left behind
    logger.info("Preprocessed %d %s once into %s (%.1f MiB)", len(split), description, folder, needed / 2**20)
    return ImageCache(folder)


def _fill_staging(staging, shape, split, image_processor, num_workers, show_progress, description) -> None:
    np.memmap(staging / "pixels.uint8", dtype=np.uint8, mode="w+", shape=shape).flush()
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    size = chunk_size(len(split), workers)
    chunks = [range(start, min(start + size, len(split))) for start in range(0, len(split), size)]
    sources = split.select_columns(["image"])
    jobs = [
        (staging / "pixels.uint8", shape, list(rows), sources[rows.start : rows.stop]["image"], image_processor)
        for rows in chunks
    ]
    with tqdm(total=len(split), desc=f"Preprocessing {description}", unit="img", disable=not show_progress) as bar:
        if workers <= 1 or len(chunks) == 1:
            for job in jobs:
                bar.update(_fill(*job))
        else:
            with process_pool(min(workers, len(chunks))) as pool:  # one-thread workers: captioning/workers.py
                for done in pool.map(_fill_job, jobs):
                    bar.update(done)
    (staging / "meta.json").write_text(json.dumps({"shape": list(shape), "rows": len(split)}))


def check_free_space(needed: int, folder: Path, what: str) -> None:
    """Refuse to fill the disk: the cache may take at most ``1 - MIN_FREE_FRACTION`` of the free space."""
    free = shutil.disk_usage(folder).free
    if needed > free * (1 - MIN_FREE_FRACTION):
        raise OSError(
            f"Preprocessing {what} needs {needed / 2**30:.1f} GiB in {folder}, which has {free / 2**30:.1f} GiB free "
            f"(the cache leaves at least {MIN_FREE_FRACTION:.0%} of it free): point --image_cache_dir elsewhere or "
            "pass --preprocess_images false."
        )


def remove_stale_staging(root: Path) -> list[Path]:
    """Remove the staging folders that builds killed before their ``finally`` left in ``root``: those of processes
    of this machine that no longer run, and any unchanged for ``STALE_STAGING_HOURS`` (another machine's, or a
    reused process id). Returns the folders removed."""
    removed = []
    host = socket.gethostname()
    for path in root.glob(f"*{STAGING_MARK}*"):
        owner = path.name.rsplit(STAGING_MARK, 1)[1]
        owner_host, _, pid = owner.rpartition("-")
        try:  # a live build keeps writing its pixels file
            age_hours = (time.time() - max(p.stat().st_mtime for p in (path, *path.iterdir()))) / 3600
        except OSError:  # removed meanwhile
            continue
        dead = owner_host in ("", host) and pid.isdigit() and not _process_alive(int(pid))
        if dead or age_hours > STALE_STAGING_HOURS:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("Removed the staging folder %s of an interrupted preprocessing run", path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def chunk_size(num_images: int, workers: int) -> int:
    """Images per worker task: about four tasks per worker (so they finish together), at most ``CHUNK``."""
    return max(1, min(CHUNK, math.ceil(num_images / (4 * max(workers, 1)))))


def _resize(images, image_processor) -> torch.Tensor:
    """The processor's own resize, without rescaling or normalising: uint8 (N, 3, H, W)."""
    pixels = image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    if pixels.dim() == 5:  # processors with a per-row image axis (SmolVLM) read a flat list as one row of N images
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        if len(pixels) != len(images):
            raise ValueError(
                f"{type(image_processor).__name__} made {len(pixels)} crops of {len(images)} images; preprocessing "
                "needs one array per image (turn image splitting off, or pass --preprocess_images false)."
            )
    return pixels.round().clamp(0, 255).to(torch.uint8)


def _fill_job(job) -> int:
    return _fill(*job)


def _fill(path: Path, shape: tuple, rows: list[int], sources: list, image_processor) -> int:
    pixels = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    resized = _resize([load_image(source) for source in sources], image_processor)
    pixels[rows[0] : rows[-1] + 1] = resized.numpy()
    pixels.flush()
    return len(rows)
