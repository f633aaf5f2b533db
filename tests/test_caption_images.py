"""caption_images.py writes as it goes (<output>.partial), resumes an interrupted run, never replaces an output
unasked, and captions files whose names are not UTF-8 into valid UTF-8 outputs."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import caption_images
from caption_images import main, partial_path, skipped_path
from captioning.inference import load_captioner

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30), (200, 200, 200)]


@pytest.fixture(scope="module")
def five_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("five")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32 + 4 * i, 32), colour).save(folder / f"img_{i}.png")
    return folder


def png_bytes(colour=(10, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(model: Path, images: Path, output: Path, *extra: str):
    argv = ["--model", str(model), "--images", str(images), "--output", str(output), "--num_workers", "0"]
    return main([*argv, "--batch_size", "2", "--max_new_tokens", "4", "--num_beams", "1", *extra])


class Interrupt:
    """load_captioner whose captioner is interrupted (Ctrl-C) at generate call number ``stop_at``; counts images."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.calls, self.images = stop_at, 0, 0

    def __call__(self, *args, **kwargs):
        captioner = load_captioner(*args, **kwargs)
        generate = captioner.generate

        def counting(batch, **overrides):
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt
            self.images += len(batch["pixel_values"])
            return generate(batch, **overrides)

        captioner.generate = counting
        return captioner


@pytest.mark.parametrize("extension", [".jsonl", ".csv"])
def test_an_interrupted_run_keeps_its_captions_and_resume_writes_the_same_file(
    tiny_blip, five_images, tmp_path, monkeypatch, extension
):
    reference = tmp_path / f"whole{extension}"
    caption(tiny_blip, five_images, reference)
    assert not partial_path(reference).exists()

    output = tmp_path / f"captions{extension}"
    monkeypatch.setattr(caption_images, "load_captioner", Interrupt(stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        caption(tiny_blip, five_images, output)
    assert not output.exists()
    kept = partial_path(output).read_text(encoding="utf-8")
    whole = reference.read_text(encoding="utf-8")
    assert whole.startswith(kept) and kept.count("img_") == 2  # the first batch, on disk
    with partial_path(output).open("a", encoding="utf-8") as handle:
        handle.write(
            '{"image": "cut sh' if extension == ".jsonl" else 'img_9.png,"a two-line\ncaption, cut sh'
        )  # killed mid-write

    with pytest.raises(ValueError, match=r"captions of an interrupted run: pass --resume .* or --overwrite"):
        caption(tiny_blip, five_images, output)
    resumed = Interrupt()
    monkeypatch.setattr(caption_images, "load_captioner", resumed)
    result = caption(tiny_blip, five_images, output, "--resume")
    assert resumed.images == 3  # only the images the first run did not caption
    assert output.read_bytes() == reference.read_bytes() and not partial_path(output).exists()
    assert [Path(image).name for image, _ in result.captions] == [f"img_{i}.png" for i in range(5)]


def test_an_existing_output_is_replaced_only_with_overwrite(tiny_blip, five_images, tmp_path):
    output = tmp_path / "captions.jsonl"
    output.write_text("earlier work\n")
    with pytest.raises(ValueError, match=r"--output .*captions\.jsonl already exists: pass --overwrite to replace it"):
        caption(Path("never/loaded"), five_images, output)
    with pytest.raises(ValueError, match="already exists"):
        caption(Path("never/loaded"), five_images, output, "--resume")
    assert output.read_text() == "earlier work\n"
    caption(tiny_blip, five_images, output, "--overwrite")
    assert len(output.read_text().splitlines()) == 5


def test_file_names_that_are_not_utf8_are_captioned_into_valid_utf8(tiny_blip, tmp_path, caplog):
    folder = tmp_path / "latin1"
    folder.mkdir()
    raw_folder = os.fsencode(folder)
    with open(os.path.join(raw_folder, b"caf\xe9.png"), "wb") as handle:
        handle.write(png_bytes())
    with open(os.path.join(raw_folder, b"vide\xff.png"), "wb"):  # empty: skipped, and listed
        pass

    jsonl = tmp_path / "captions.jsonl"
    result = caption(tiny_blip, folder, jsonl)
    assert len(result.captions) == 1 and len(result.skipped) == 1
    text = jsonl.read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert '"image": "' + str(folder) + '/caf\\udce9.png"' in text
    (row,) = [json.loads(line) for line in text.splitlines()]
    assert os.fsencode(row["image"]) == os.path.join(raw_folder, b"caf\xe9.png")  # the exact name, back
    assert skipped_path(jsonl).read_bytes().decode("utf-8").startswith(f"{folder}/vide\\xff.png\t")
    # The log names the file as the list does: text a UTF-8 log file (or a pytest-xdist worker) takes
    (skip,) = [record.getMessage() for record in caplog.records if "Skipping unreadable image" in record.message]
    assert skip.startswith(f"Skipping unreadable image {folder}/vide\\xff.png: ")
    (summary,) = [record.getMessage() for record in caplog.records if "skipped 1 unreadable" in record.message]
    assert f": {folder}/vide\\xff.png; wrote {jsonl}" in summary
    for record in caplog.records:
        record.getMessage().encode("utf-8")

    table = tmp_path / "captions.csv"
    caption(tiny_blip, folder, table)
    rows = list(csv.reader(io.StringIO(table.read_bytes().decode("utf-8"))))
    assert rows[0] == ["image", "caption"] and [row[0] for row in rows[1:]] == [f"{folder}/caf\\xe9.png"]
    assert rows[1][1] == row["caption"]

    # --resume recognises the names it wrote
    partial_path(table).write_text(table.read_text(encoding="utf-8"), encoding="utf-8")
    table.unlink()
    assert caption(tiny_blip, folder, table, "--resume").captions == [(f"{folder}/caf\\xe9.png", row["caption"])]
