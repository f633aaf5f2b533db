"""The catalogue of bad inputs (``captioning.scan``'s docstring), one test per entry: each asserts the exact
outcome (accepted and normalised, skipped or dropped with its reason and count, or a fatal error before training),
then the report, the --max_bad_fraction stop, and the scan's parallelism and order."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor

from captioning.arguments import DataArguments
from captioning.data import CaptionImages, CaptionPairs, UnreadableImageError, load_caption_splits
from captioning.images import load_image
from captioning.scan import REPORT_FILE, DataReport, scan_splits, write_data_report
from captioning.sources.core import LOCAL_FEATURES

EXIF_ORIENTATION = 0x0112
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# Builders: every file is made here, in tmp_path, with PIL
# --------------------------------------------------------------------------------------------------------------


def good_png(path: Path, colour=(30, 60, 90), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red in CMYK
    return path


def rgba_png(path: Path) -> Path:
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (0, 0, 0, 0)  # fully transparent black
    array[0, 1] = (255, 0, 0, 255)  # opaque red
    array[1, :] = (0, 0, 255, 255)  # opaque blue
    Image.fromarray(array, mode="RGBA").save(path)
    return path


def palette_png(path: Path) -> Path:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)  # index 0: transparent
    image.putpixel((1, 0), 1)  # index 1: opaque green
    image.save(path, transparency=0)
    return path


def la_png(path: Path) -> Path:
    Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA").save(path)  # transparent, opaque black
    return path


def grey16_png(path: Path) -> Path:
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode == "I;16"
    image.save(path)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 16x8 (left half red, right half blue) with orientation 6: displayed 8x16, red on top."""
    array = np.zeros((8, 16, 3), dtype=np.uint8)
    array[:, :8], array[:, 8:] = RED, BLUE
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6
    image.save(path, format="JPEG", exif=exif, quality=95)
    return path


def one_pixel_png(path: Path) -> Path:
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_byte_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_named_jpg(path: Path) -> Path:
    path.write_text("this is not an image\n", encoding="utf-8")
    return path


def missing_file(path: Path) -> Path:
    return path  # never written


def split_of(paths: list[Path], captions_per_image: int = 2) -> datasets.Dataset:
    """A per-image split like ``load_caption_splits`` gives: absolute paths, references, image ids."""
    return datasets.Dataset.from_dict(
        {
            "image": [str(path) for path in paths],
            "references": [[f"{path.name} caption {k}" for k in range(captions_per_image)] for path in paths],
            "image_id": [path.name for path in paths],
        },
        features=LOCAL_FEATURES,
    )


def scan(paths: list[Path], **kwargs) -> tuple[datasets.Dataset, DataReport]:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("max_bad_fraction", 1.0)
    splits, report = scan_splits({"train": split_of(paths)}, **kwargs)
    return splits["train"], report


def ids(split: datasets.Dataset) -> list[str]:
    return split.select_columns(["image_id"])[:]["image_id"]


@pytest.fixture(scope="module")
def processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": 32, "width": 32})


def normalised(processor: BlipImageProcessor, rgb) -> list[float]:
    statistics = zip(rgb, processor.image_mean, processor.image_std, strict=True)
    return [(value / 255 - mean) / std for value, mean, std in statistics]


# --------------------------------------------------------------------------------------------------------------
# Images: readable but unusual ones are accepted and normalised
# --------------------------------------------------------------------------------------------------------------

ACCEPTED = {
    # name: (builder, file name, size of the upright RGB image, {(x, y): expected RGB})
    "cmyk_jpeg": (cmyk_jpeg, "cmyk.jpg", (8, 8), {(4, 4): RED}),
    "rgba_png": (rgba_png, "rgba.png", (2, 2), {(0, 0): WHITE, (1, 0): RED, (0, 1): BLUE}),
    "palette_png_with_transparency": (palette_png, "palette.png", (2, 1), {(0, 0): WHITE, (1, 0): GREEN}),
    "la_png": (la_png, "la.png", (2, 1), {(0, 0): WHITE, (1, 0): BLACK}),
    "16_bit_png": (grey16_png, "grey16.png", (4, 4), {(0, 0): (128, 128, 128)}),
    "exif_rotated_jpeg": (exif_rotated_jpeg, "rotated.jpg", (8, 16), {(4, 2): RED, (4, 12): BLUE}),
    "1x1_pixel": (one_pixel_png, "dot.png", (1, 1), {(0, 0): (200, 10, 10)}),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_but_readable_images_are_accepted_and_normalised(case, tmp_path, processor):
    build, name, size, pixels = ACCEPTED[case]
    path = build(tmp_path / name)

    kept, report = scan([path])

    assert ids(kept) == [name]
    assert report.splits["train"].to_dict()["images_skipped"] == {}
    image = load_image(str(path))
    assert image.mode == "RGB"
    assert image.size == size
    array = np.asarray(image).astype(int)
    for (x, y), rgb in pixels.items():
        assert np.abs(array[y, x] - np.array(rgb)).max() <= 2, (case, (x, y), array[y, x].tolist())
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    assert torch.isfinite(pixel_values).all()


def test_one_pixel_image_is_resized_by_the_processor_to_its_exact_colour(tmp_path, processor):
    image = load_image(str(one_pixel_png(tmp_path / "dot.png")))

    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]

    expected = torch.tensor(normalised(processor, (200, 10, 10))).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(pixel_values[0], expected, atol=1e-4, rtol=0)


def test_min_image_side_skips_smaller_images(tmp_path):
    dot, tall = one_pixel_png(tmp_path / "dot.png"), good_png(tmp_path / "tall.png", size=(1, 50))
    good = good_png(tmp_path / "good.png")

    kept, report = scan([dot, good, tall], min_image_side=2)

    assert ids(kept) == ["good.png"]
    assert report.splits["train"].to_dict()["images_skipped"] == {"too_small": 2}
    example = report.splits["train"].examples[0]
    assert example["image"] == str(dot) and example["reason"] == "too_small" and "1x1 px" in example["detail"]


# --------------------------------------------------------------------------------------------------------------
# Images: unreadable ones are skipped, counted and named
# --------------------------------------------------------------------------------------------------------------

SKIPPED = {
    "truncated_jpeg": (truncated_jpeg, "cut.jpg", "truncated", "image file is truncated"),
    "zero_byte_file": (zero_byte_file, "empty.jpg", "empty_file", "0 bytes"),
    "missing_file": (missing_file, "gone.jpg", "missing", "No such file"),
    "text_file_named_jpg": (text_named_jpg, "notes.jpg", "not_an_image", "cannot identify image file"),
}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_unreadable_images_are_skipped_with_their_reason(case, tmp_path):
    build, name, reason, detail = SKIPPED[case]
    first, last = good_png(tmp_path / "first.png"), good_png(tmp_path / "last.png")
    bad = build(tmp_path / name)

    kept, report = scan([first, bad, last])

    assert ids(kept) == ["first.png", "last.png"]
    split = report.splits["train"]
    assert (split.images_total, split.images_kept, split.to_dict()["images_skipped"]) == (3, 2, {reason: 1})
    assert split.captions == 4  # the skipped image's captions went with it
    [example] = split.examples
    assert example["index"] == 1 and example["image"] == str(bad) and example["image_id"] == name
    assert example["reason"] == reason and detail in example["detail"]


@pytest.mark.parametrize(
    ("side", "detail"),
    [(11, "11x11 px: 121 pixels, above PIL.Image.MAX_IMAGE_PIXELS 100"), (15, "DecompressionBombError")],
    ids=["warning_range", "error_range"],
)
def test_images_over_the_decompression_bomb_limit_are_skipped(side, detail, tmp_path, monkeypatch):
    # PIL warns from MAX_IMAGE_PIXELS (100 here: 11x11 = 121) and raises from twice that (15x15 = 225); both skip.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    small, big = good_png(tmp_path / "small.png", size=(10, 10)), good_png(tmp_path / "big.png", size=(side, side))

    kept, report = scan([small, big])

    assert ids(kept) == ["small.png"]
    assert report.splits["train"].to_dict()["images_skipped"] == {"too_large": 1}
    [example] = report.splits["train"].examples
    assert example["image"] == str(big) and example["reason"] == "too_large"
    assert detail in example["detail"]
    assert report.settings["max_image_pixels"] == 100


# --------------------------------------------------------------------------------------------------------------
# Captions: cleaned while loading, counted per source in the report
# --------------------------------------------------------------------------------------------------------------


def data_args(**kwargs) -> DataArguments:
    kwargs.setdefault("validation_split_percentage", 0)
    kwargs.setdefault("test_split_percentage", 0)
    return DataArguments(**kwargs)


def write_csv(path: Path, rows: list[list[str]], header=("image", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def load_with_report(file: Path, **kwargs) -> tuple[datasets.Dataset, dict]:
    report = DataReport()
    train = load_caption_splits(data_args(train_file=str(file), **kwargs), report=report)["train"]
    return train, report.sources[f"--train_file {file}"].to_dict()


def refs_by_id(split: datasets.Dataset) -> dict[str, list[str]]:
    columns = split.select_columns(["image_id", "references"])[:]
    return dict(zip(columns["image_id"], columns["references"], strict=True))


@pytest.mark.parametrize(
    ("cell", "reason"),
    [("", "empty"), ("   \t ", "whitespace_only"), ("NaN", "nan"), ("nan", "nan"), ("None", "nan"), ("null", "nan")],
    ids=["empty", "whitespace_only", "csv_NaN", "csv_nan", "csv_None", "csv_null"],
)
def test_empty_whitespace_and_nan_csv_captions_are_dropped(cell, reason, tmp_path):
    good_png(tmp_path / "a.png")
    file = write_csv(tmp_path / "train.csv", [["a.png", "a kept caption"], ["a.png", cell]])

    train, stats = load_with_report(file)

    assert refs_by_id(train) == {"a.png": ["a kept caption"]}
    assert stats["captions_dropped"] == {reason: 1}
    assert stats["examples"] == [{"reason": reason, "where": "row 2 (line 3)", "value": cell}]
    assert (stats["rows"], stats["images"], stats["captions"]) == (2, 1, 1)


@pytest.mark.parametrize(
    ("literal", "reason"), [("NaN", "nan"), ("null", "null")], ids=["jsonl_NaN_literal", "jsonl_null"]
)
def test_nan_and_null_jsonl_captions_are_dropped(literal, reason, tmp_path):
    good_png(tmp_path / "a.png")
    file = tmp_path / "train.jsonl"
    file.write_text(
        '{"image": "a.png", "caption": "kept"}\n\n{"image": "a.png", "caption": ' + literal + "}\n", encoding="utf-8"
    )

    train, stats = load_with_report(file)

    assert refs_by_id(train) == {"a.png": ["kept"]}
    assert stats["captions_dropped"] == {reason: 1}
    assert stats["examples"][0]["reason"] == reason and stats["examples"][0]["where"] == "line 3"


def test_image_left_without_captions_is_dropped_and_counted(tmp_path):
    good_png(tmp_path / "a.png"), good_png(tmp_path / "b.png")
    file = write_csv(tmp_path / "train.csv", [["a.png", "a caption"], ["b.png", " "], ["b.png", "NaN"]])

    train, stats = load_with_report(file)

    assert refs_by_id(train) == {"a.png": ["a caption"]}
    assert stats["images_without_captions"] == 1
    assert stats["captions_dropped"] == {"whitespace_only": 1, "nan": 1}
    assert {"reason": "no_caption", "where": "b.png"} in stats["examples"]


def test_thousand_word_caption_is_kept_whole_and_counted_as_long(tmp_path):
    good_png(tmp_path / "a.png")
    long_caption = " ".join(f"word{i}" for i in range(1000))
    file = write_csv(tmp_path / "train.csv", [["a.png", "short one"], ["a.png", long_caption]])

    train, stats = load_with_report(file, max_caption_length=64)

    assert refs_by_id(train) == {"a.png": ["short one", long_caption]}  # the collator truncates, not the loader
    assert stats["long_captions"] == 1 and stats["long_caption_words"] == 64
    assert stats["captions_dropped"] == {}
    [example] = stats["examples"]
    assert example["reason"] == "long" and example["where"] == "row 2 (line 3)" and example["value"].endswith("...")


def test_csv_row_with_non_utf8_bytes_is_skipped_with_its_row_number(tmp_path):
    good_png(tmp_path / "a.png"), good_png(tmp_path / "b.png")
    file = tmp_path / "train.csv"
    file.write_bytes(
        b"image,caption\n"
        b"a.png,a dog in a caf\xc3\xa9\n"  # UTF-8: kept
        b"a.png,a dog in a caf\xe9\n"  # latin-1: skipped
        b"b.png,a cat\n"
    )

    train, stats = load_with_report(file)

    assert refs_by_id(train) == {"a.png": ["a dog in a café"], "b.png": ["a cat"]}
    assert stats["rows_skipped"] == {"non_utf8": 1}
    assert stats["examples"] == [
        {"reason": "non_utf8", "where": "row 2 (line 3)", "value": r"b'a.png,a dog in a caf\xe9'"}
    ]
    assert stats["rows"] == 3


def test_duplicate_image_caption_rows_collapse_to_one_reference(tmp_path):
    good_png(tmp_path / "a.png")
    file = write_csv(
        tmp_path / "train.csv", [["a.png", "a red ball"], ["a.png", "a blue ball"], ["./a.png", " a red ball "]]
    )

    train, stats = load_with_report(file)

    assert refs_by_id(train) == {"a.png": ["a red ball", "a blue ball"]}
    assert stats["duplicate_captions_collapsed"] == 1
    assert stats["examples"] == [{"reason": "duplicate", "where": "row 3 (line 4)", "value": "a red ball"}]


# --------------------------------------------------------------------------------------------------------------
# Structure: fatal before training, naming the file, the columns and the flag
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize(
    ("columns", "flag"), [(("path", "caption"), "--image_column"), (("image", "words"), "--caption_column")]
)
def test_missing_image_or_caption_column_is_fatal_and_names_file_columns_and_flag(suffix, columns, flag, tmp_path):
    good_png(tmp_path / "a.png")
    file = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        write_csv(file, [["a.png", "a caption"]], header=columns)
    else:
        file.write_text(json.dumps(dict(zip(columns, ["a.png", "a caption"], strict=True))) + "\n", encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_caption_splits(data_args(train_file=str(file)))

    message = str(error.value)
    assert f"--train_file {file}" in message
    assert f"(columns: {', '.join(columns)})" in message
    assert flag in message


# --------------------------------------------------------------------------------------------------------------
# The report, --max_bad_fraction, parallelism and order, the views over clean splits
# --------------------------------------------------------------------------------------------------------------


def mixed_paths(tmp_path: Path, good: int) -> tuple[list[Path], list[Path]]:
    """``good`` good images with a truncated, a missing and a text file among them; (all paths, bad paths)."""
    paths = [good_png(tmp_path / f"good{i:03d}.png", (i, 2 * i % 256, 100)) for i in range(good)]
    bad = [
        truncated_jpeg(tmp_path / "cut.jpg"),
        missing_file(tmp_path / "gone.jpg"),
        text_named_jpg(tmp_path / "t.jpg"),
    ]
    for position, path in zip((1, good // 2 + 1, good + 2), bad, strict=True):  # second, middle, last
        paths.insert(position, path)
    return paths, bad


def test_above_max_bad_fraction_the_run_stops_naming_split_fraction_flag_and_files(tmp_path):
    paths, bad = mixed_paths(tmp_path, good=17)  # 3 bad of 20: 15 %
    output_dir = tmp_path / "out"

    with pytest.raises(ValueError) as error:
        scan_splits(
            {"train": split_of(paths[:10]), "validation": split_of(paths[10:])},
            num_workers=0,
            max_bad_fraction=0.1,
            show_progress=False,
            report_dir=output_dir,
        )

    message = str(error.value)
    assert "the train split has 2 unusable image(s) out of 10 (20.00%)" in message
    assert "above --max_bad_fraction 0.1" in message
    assert "validation split" not in message  # 1 of 10 is not above 0.1
    assert f"{bad[0]} (truncated: " in message and f"{bad[1]} (missing: " in message
    assert str(output_dir / REPORT_FILE) in message
    written = json.loads((output_dir / REPORT_FILE).read_text())  # written before the error
    assert written["splits"]["train"]["images_skipped"] == {"truncated": 1, "missing": 1}


def test_a_split_with_no_usable_image_always_stops_the_run(tmp_path):
    with pytest.raises(ValueError, match=r"the train split has 1 unusable image\(s\) out of 1 .*none is usable"):
        scan([missing_file(tmp_path / "gone.jpg")], max_bad_fraction=1.0)


def test_below_max_bad_fraction_the_run_goes_on_and_the_report_has_the_counts(tmp_path):
    paths, bad = mixed_paths(tmp_path, good=297)  # 3 of 300: 1 %, not above 1 %
    output_dir = tmp_path / "out"

    splits, report = scan_splits(
        {"train": split_of(paths)}, num_workers=2, max_bad_fraction=0.01, show_progress=False, report_dir=output_dir
    )

    assert len(splits["train"]) == 297
    written = json.loads((output_dir / REPORT_FILE).read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    train = written["splits"]["train"]
    assert (train["images_total"], train["images_kept"], train["captions"]) == (300, 297, 594)
    assert train["images_skipped"] == {"truncated": 1, "missing": 1, "not_an_image": 1}
    assert train["bad_fraction"] == 0.01
    assert [example["image"] for example in train["examples"]] == [str(path) for path in bad]
    assert written["settings"] == {
        "max_bad_fraction": 0.01,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "min_image_side": 1,
        "num_workers": 2,
        "scan_images": True,
    }


def test_parallel_scan_in_chunks_matches_the_serial_one_and_keeps_order(tmp_path):
    paths, _ = mixed_paths(tmp_path, good=37)
    split = split_of(paths)

    serial, serial_report = scan_splits({"train": split}, num_workers=0, max_bad_fraction=1, show_progress=False)
    parallel, parallel_report = scan_splits(
        {"train": split}, num_workers=2, chunk_size=3, max_bad_fraction=1, show_progress=False
    )

    expected = [path.name for path in paths if path.name.startswith("good")]
    assert ids(parallel["train"]) == ids(serial["train"]) == expected
    assert parallel_report.splits["train"].to_dict() == serial_report.splits["train"].to_dict()
    assert parallel_report.settings["num_workers"] == 2


def test_caption_pairs_over_the_clean_split_never_yield_a_bad_image(tmp_path, processor):
    paths, _ = mixed_paths(tmp_path, good=9)
    paths += [cmyk_jpeg(tmp_path / "cmyk.jpg"), grey16_png(tmp_path / "g16.png"), one_pixel_png(tmp_path / "1.png")]

    clean, _ = scan(paths)
    pairs = CaptionPairs(clean)
    rows = [pairs[i] for i in range(len(pairs))]

    assert len(rows) == 2 * 12
    assert all(row["image"].mode == "RGB" for row in rows)
    pixel_values = processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (24, 3, 32, 32)


def test_without_the_scan_nothing_is_removed_and_a_bad_image_fails_naming_the_file(tmp_path, caplog):
    paths, bad = mixed_paths(tmp_path, good=3)

    with caplog.at_level("WARNING", logger="captioning.scan"):
        kept, report = scan(paths, scan_images=False, max_bad_fraction=0.0)

    assert len(kept) == 6
    assert report.splits["train"].to_dict()["scanned"] is False
    assert any("--scan_images false" in record.getMessage() for record in caplog.records)
    with pytest.raises(UnreadableImageError, match=rf"{bad[0]} \(row 1 of its split\).*--scan_images"):
        CaptionImages(kept)[1]


def test_load_then_scan_fills_one_report_with_captions_and_images(tmp_path):
    for name in ("a.png", "b.png"):
        good_png(tmp_path / name)
    truncated_jpeg(tmp_path / "cut.jpg")
    file = write_csv(
        tmp_path / "train.csv",
        [["a.png", "a one"], ["a.png", "a one"], ["b.png", ""], ["b.png", "b one"], ["cut.jpg", "cut one"]],
    )
    report = DataReport()

    splits = load_caption_splits(data_args(train_file=str(file)), report=report)
    splits, report = scan_splits(splits, report=report, num_workers=0, max_bad_fraction=0.5, show_progress=False)

    path = write_data_report(report, tmp_path / "out")

    assert path == tmp_path / "out" / REPORT_FILE
    document = json.loads(path.read_text())
    source = document["sources"][f"--train_file {file}"]
    assert source["duplicate_captions_collapsed"] == 1 and source["captions_dropped"] == {"empty": 1}
    train = document["splits"]["train"]
    assert (train["images_total"], train["images_kept"], train["captions"]) == (3, 2, 2)
    assert train["images_skipped"] == {"truncated": 1}
    assert ids(splits["train"]) == ["a.png", "b.png"]
