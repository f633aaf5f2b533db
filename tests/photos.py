"""Real-size test photos: JPEGs of 500x375 and 640x480 (Flickr / COCO sizes), a few PNGs, and EXIF-rotated JPEGs.

Tiny images hide what real data does: torch starts its thread pool only for large resizes, JPEG decoding and EXIF
rotation cost real time. Every photo is a smooth random scene (so JPEG compresses it like a photo) with a coloured
object whose colour and place the captions name, so a model can learn something from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40)}
THINGS = ("dog", "cat", "ball", "man")
SIZES = ((500, 375), (640, 480), (375, 500))  # landscape Flickr, COCO, portrait Flickr
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Photo:
    """One generated photo: its file name (relative to the folder) and its captions."""

    file_name: str
    captions: list[str]
    size: tuple[int, int]  # (width, height) as a viewer shows it, after EXIF rotation


def draw_photo(index: int, size: tuple[int, int], seed: int = 0) -> tuple[Image.Image, str, str]:
    """A smooth random background with a coloured ellipse; returns (image, colour, thing)."""
    rng = np.random.default_rng(seed * 100_003 + index)
    width, height = size
    coarse = rng.integers(60, 200, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    colour = list(COLOURS)[index % len(COLOURS)]
    thing = THINGS[(index // len(COLOURS)) % len(THINGS)]
    cx, cy = int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 4, 3 * height // 4))
    radius = min(width, height) // 4
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[colour])
    return image, colour, thing


def captions_for(colour: str, thing: str) -> list[str]:
    return [f"a {colour} {thing}", f"the {thing} is {colour}", f"a {thing} on a {colour} background"]


def write_photos(folder: Path, count: int, *, seed: int = 0, png_every: int = 7, rotate_every: int = 5) -> list[Photo]:
    """Write ``count`` photos into ``folder``: mostly JPEGs, every ``png_every``-th a PNG, every ``rotate_every``-th
    JPEG stored sideways with an EXIF orientation tag (6: rotate 90 degrees clockwise to view) as phones write them."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        image, colour, thing = draw_photo(i, size, seed)
        if png_every and i % png_every == png_every - 1:
            name = f"photo_{i:04d}.png"
            image.save(folder / name)
        elif rotate_every and i % rotate_every == rotate_every - 1:
            name = f"photo_{i:04d}.jpg"
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            # Stored rotated 90 degrees counter-clockwise; orientation 6 tells viewers to turn it back.
            image.transpose(Image.Transpose.ROTATE_90).save(folder / name, quality=90, exif=exif)
        else:
            name = f"photo_{i:04d}.jpg"
            image.save(folder / name, quality=90)
        photos.append(Photo(name, captions_for(colour, thing), size))
    return photos


def write_photo_folder(root: Path, count: int = 24, *, seed: int = 0) -> Path:
    """An image folder (metadata.jsonl with ``file_name`` and a ``caption`` list) of ``count`` real-size photos."""
    photos = write_photos(root, count, seed=seed)
    rows = [{"file_name": photo.file_name, "caption": photo.captions} for photo in photos]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root
