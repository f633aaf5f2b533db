"""Preprocess once: cached uint8 pixels give exactly the pixel_values of processing the original images."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, BlipImageProcessor, BlipImageProcessorPil

from captioning.data import CaptionImages, CaptionPairs
from captioning.families import BLIP
from captioning.image_cache import build_image_cache, cache_key
from captioning.images import load_image
from collators import CaptionCollator, build_layout


@pytest.fixture()
def image_split(tmp_path) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(300, 500), (64, 64), (90, 100), (41, 17), (128, 96)]):
        path = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return datasets.Dataset.from_dict(
        {
            "image": paths,
            "references": [[f"caption {i}", f"other {i}"] for i in range(5)],
            "image_id": [f"img{i}" for i in range(5)],
        }
    )


@pytest.mark.parametrize("processor_class", [BlipImageProcessor, BlipImageProcessorPil])
def test_cached_pixels_equal_processing_the_originals(image_split, tmp_path, processor_class):
    processor = processor_class(size={"height": 48, "width": 48})
    cache = build_image_cache(image_split, processor, root=tmp_path / "cache", num_workers=0, show_progress=False)
    assert len(cache) == 5 and cache[0].dtype == torch.uint8 and tuple(cache[0].shape) == (3, 48, 48)
    originals = [Image.open(path).convert("RGB") for path in image_split["image"]]
    expected = processor(images=originals, return_tensors="pt")["pixel_values"]
    cached = processor(images=[cache[i] for i in range(5)], do_resize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(cached, expected)


def test_parallel_build_equals_serial_and_is_reused(image_split, tmp_path, monkeypatch):
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    monkeypatch.setattr("captioning.image_cache.CHUNK", 2)  # several chunks, so the pool really splits the work
    serial = build_image_cache(image_split, processor, root=tmp_path / "a", num_workers=0, show_progress=False)
    parallel = build_image_cache(image_split, processor, root=tmp_path / "b", num_workers=2, show_progress=False)
    assert all(torch.equal(serial[i], parallel[i]) for i in range(5))
    pixels = serial.folder / "pixels.uint8"
    before = pixels.stat().st_mtime_ns
    again = build_image_cache(image_split, processor, root=tmp_path / "a", num_workers=0, show_progress=False)
    assert again.folder == serial.folder and pixels.stat().st_mtime_ns == before  # reused, not rebuilt


def test_the_key_follows_the_images_and_the_resize(image_split):
    small, large = (
        BlipImageProcessor(size={"height": 32, "width": 32}),
        BlipImageProcessor(size={"height": 64, "width": 64}),
    )
    key = cache_key(image_split, small)
    assert cache_key(image_split, small) == key
    assert cache_key(image_split, large) != key
    path = image_split["image"][2]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was replaced
    assert cache_key(image_split, small) != key


def test_views_and_collator_give_the_same_batches_with_the_cache(image_split, tmp_path, tiny_blip):
    processor = AutoProcessor.from_pretrained(tiny_blip)
    layout = build_layout(BLIP, AutoConfig.from_pretrained(tiny_blip), processor.tokenizer)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)
    cache = build_image_cache(image_split, processor.image_processor, root=tmp_path, num_workers=0, show_progress=False)
    plain, cached = CaptionPairs(image_split), CaptionPairs(image_split, cache=cache)
    rows = [3, 0, 7, 1]
    batch, cached_batch = collator([plain[i] for i in rows]), collator([cached[i] for i in rows])
    assert batch.keys() == cached_batch.keys()
    for key in batch:
        assert torch.equal(batch[key], cached_batch[key]), key
    images, cached_images = CaptionImages(image_split), CaptionImages(image_split, cache=cache)
    generation = collator([images[i] for i in range(5)])
    cached_generation = collator([cached_images[i] for i in range(5)])
    assert torch.equal(generation["pixel_values"], cached_generation["pixel_values"])


def test_real_size_photos_cache_the_upright_processed_pixels_in_parallel(photo_folder, tmp_path):
    """500x375 / 640x480 / portrait JPEGs, PNGs and EXIF-rotated JPEGs, two worker processes: each cached row is
    exactly the processor's resize of the image as load_image opens it (upright RGB)."""
    paths = sorted(str(path) for path in photo_folder.glob("photo_*"))[:24]
    split = datasets.Dataset.from_dict({"image": paths})
    processor = BlipImageProcessor(size={"height": 96, "width": 96})
    cache = build_image_cache(split, processor, root=tmp_path, num_workers=2, show_progress=False)
    originals = [load_image(path) for path in paths]
    assert {image.size for image in originals} == {(500, 375), (640, 480), (375, 500)}
    expected = processor(images=originals, do_rescale=False, do_normalize=False, return_tensors="pt")
    expected = expected["pixel_values"].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(torch.stack([cache[i] for i in range(len(paths))]), expected)


def _staging_folders(root) -> list[str]:
    return sorted(path.name for path in root.iterdir() if ".tmp-" in path.name)


def test_a_failed_build_leaves_no_staging_folder(image_split, tmp_path, monkeypatch):
    processor = BlipImageProcessor(size={"height": 32, "width": 32})

    def broken_fill(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("captioning.image_cache._fill", broken_fill)
    with pytest.raises(OSError, match="No space left"):
        build_image_cache(image_split, processor, root=tmp_path / "cache", num_workers=0, show_progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_staging_folders_are_removed_at_the_next_build(image_split, tmp_path):
    root = tmp_path / "cache"
    host = socket.gethostname()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    day_ago = time.time() - 25 * 3600
    folders = {
        f"a.tmp-{host}-{finished.pid}": None,  # this machine, process gone: stale
        f"b.tmp-{finished.pid}": None,  # the same, named the way older versions did
        "c.tmp-elsewhere-1": day_ago,  # another machine's, untouched for a day: stale
        f"d.tmp-{host}-{os.getpid()}": None,  # a live build of this machine
        "e.tmp-elsewhere-1": None,  # another machine's, recently written: maybe live
    }
    for name, stamp in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "pixels.uint8").write_bytes(b"\0")
        if stamp is not None:
            for path in (root / name / "pixels.uint8", root / name):
                os.utime(path, (stamp, stamp))
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    build_image_cache(image_split, processor, root=root, num_workers=0, show_progress=False)
    assert _staging_folders(root) == [f"d.tmp-{host}-{os.getpid()}", "e.tmp-elsewhere-1"]


@pytest.mark.parametrize(("free_factor", "fits"), [(1 / 0.85, False), (1 / 0.79, True)])
def test_the_cache_leaves_a_fifth_of_the_free_disk(image_split, tmp_path, monkeypatch, free_factor, fits):
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    needed = 5 * 3 * 32 * 32
    usage = shutil._ntuple_diskusage(total=10 * needed, used=0, free=int(needed * free_factor))
    monkeypatch.setattr("captioning.image_cache.shutil.disk_usage", lambda path: usage)
    root = tmp_path / "cache"
    if fits:
        assert len(build_image_cache(image_split, processor, root=root, num_workers=0, show_progress=False)) == 5
        return
    with pytest.raises(OSError, match=r"needs 0\.0 GiB .* at least 20% of it free.*--image_cache_dir.*--preprocess"):
        build_image_cache(image_split, processor, root=root, num_workers=0, show_progress=False)
    assert list(root.iterdir()) == []
