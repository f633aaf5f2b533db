"""Tests of captioning.images.load_image: orientation, modes, transparency and the accepted sources."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioning.images import load_image

EXIF_ORIENTATION = 0x0112


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


@pytest.fixture
def red_png(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (6, 4), (255, 0, 0)).save(path)
    return path


def test_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape, displayed rotated by 90 degrees
    Image.new("RGB", (16, 8), (0, 128, 0)).save(path, exif=exif.tobytes())
    assert Image.open(path).size == (16, 8)

    image = load_image(str(path))

    assert image.mode == "RGB"
    assert image.size == (8, 16)


def test_rgba_transparent_pixels_become_white():
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (0, 0, 0, 0)  # fully transparent black
    array[0, 1] = (255, 0, 0, 255)  # opaque red
    array[1, :] = (0, 0, 255, 255)
    source = _png_bytes(Image.fromarray(array, mode="RGBA"))

    pixels = np.asarray(load_image(source))

    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [255, 0, 0]
    assert pixels[1, 0].tolist() == [0, 0, 255]


def test_palette_image_with_transparency_becomes_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)  # index 0 is transparent
    image.putpixel((1, 0), 1)  # index 1 is opaque green
    image.info["transparency"] = 0
    source = _png_bytes(image)
    assert Image.open(io.BytesIO(source)).mode == "P"

    pixels = np.asarray(load_image(source))

    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [0, 255, 0]


def test_la_image_composites_over_white():
    array = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)  # black transparent, black opaque
    source = _png_bytes(Image.fromarray(array, mode="LA"))

    pixels = np.asarray(load_image(source))

    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [0, 0, 0]


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")

    pixels = np.asarray(load_image(path))

    assert pixels.shape == (4, 4, 3)
    assert abs(int(pixels[0, 0, 0]) - 128) <= 1


def test_16_bit_in_memory_image_is_rescaled():
    image = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert image.mode == "I;16"

    pixels = np.asarray(load_image(image))

    assert abs(int(pixels[0, 0, 0]) - 128) <= 1


def test_cmyk_jpeg_becomes_rgb():
    source = _jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    assert Image.open(io.BytesIO(source)).mode == "CMYK"

    image = load_image(source)

    assert image.mode == "RGB"
    red, green, blue = np.asarray(image)[4, 4].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_bytes_dict_and_path_sources_give_the_same_image(red_png):
    data = red_png.read_bytes()
    sources = [str(red_png), red_png, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(red_png)}]

    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB"
        assert image.size == (6, 4)
        assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]


def test_dict_without_bytes_or_path_is_a_value_error():
    with pytest.raises(ValueError, match="neither bytes nor a path"):
        load_image({"bytes": None, "path": None})


def test_truncated_jpeg_raises_os_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _jpeg_bytes(Image.fromarray(noise), quality=95)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(OSError):
        load_image(str(path))
