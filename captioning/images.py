"""Opening images the way a captioner should see them: EXIF-rotated, 8-bit RGB, transparency over white."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ImageSource = str | os.PathLike | bytes | dict | Image.Image


def load_image(source: ImageSource) -> Image.Image:
    """Open ``source`` and return an upright RGB image.

    ``source`` is a path, raw bytes, a ``{"bytes": ..., "path": ...}`` dict (a ``datasets.Image(decode=False)``
    value) or a PIL image. Raises ``OSError``/``ValueError`` on unreadable input; callers decide what to do then.
    """
    image = _open(source)
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return _decoded(Image.open(io.BytesIO(source["bytes"])))
        if source.get("path"):
            return _decoded(Image.open(source["path"]))
        raise ValueError("image value has neither bytes nor a path")
    if isinstance(source, bytes | bytearray):
        return _decoded(Image.open(io.BytesIO(source)))
    return _decoded(Image.open(source))


def _decoded(image: Image.Image) -> Image.Image:
    image.load()  # decode now, so truncated files fail here and not later inside a collator
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Transparent pixels become white; 16-bit images are rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def describe(source: Any) -> str:
    """A short human-readable name for an image source, for error messages and reports."""
    if isinstance(source, dict):
        return str(source.get("path") or "<image bytes>")
    if isinstance(source, bytes | bytearray):
        return "<image bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]}>"
    return str(source)
