"""Tests of captioning.scan: one image's verdict for every kind of source, the report and its file, the
--max_bad_fraction check, settings, workers and chunks (the catalogue itself is in test_bad_inputs.py)."""

from __future__ import annotations

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from captioning import scan as scan_module
from captioning.scan import (
    REPORT_FILE,
    CaptionStats,
    DataReport,
    SplitReport,
    check_bad_fraction,
    check_image,
    scan_splits,
    write_data_report,
)
from captioning.sources.core import LOCAL_FEATURES


def png_bytes(size=(6, 4), colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def split_of(images: list, image_ids: list[str] | None = None) -> datasets.Dataset:
    image_ids = image_ids or [str(i) for i in range(len(images))]
    return datasets.Dataset.from_dict(
        {"image": [str(image) for image in images], "references": [["a caption"]] * len(images), "image_id": image_ids},
        features=LOCAL_FEATURES,
    )


def quiet(**kwargs) -> dict:
    return {"num_workers": 0, "show_progress": False, "max_bad_fraction": 1.0, **kwargs}


# --------------------------------------------------------------------------------------------------------------
# check_image
# --------------------------------------------------------------------------------------------------------------


def test_every_kind_of_source_is_decoded(tmp_path):
    data = png_bytes()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    sources = [str(path), path, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}]

    for source in sources + [Image.open(io.BytesIO(data))]:
        assert check_image(source) == (None, "", 6, 4)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"", "empty_file"),
        ({"bytes": b"", "path": None}, "empty_file"),
        ({"bytes": None, "path": None}, "missing"),
        ({"bytes": None, "path": "/no/such/file.png"}, "missing"),
        (b"GIF89a not really", "not_an_image"),
    ],
    ids=["empty_bytes", "empty_bytes_dict", "dict_without_bytes_or_path", "dict_path_missing", "fake_gif_header"],
)
def test_unusable_sources_get_their_reason(source, reason):
    assert check_image(source)[0] == reason


def test_a_directory_is_unreadable(tmp_path):
    reason, detail, _, _ = check_image(str(tmp_path))

    assert reason == "unreadable" and "IsADirectoryError" in detail


def test_a_png_with_broken_pixel_data_is_corrupt():
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 40
    data[start : start + 20] = bytes(20)

    reason, detail, _, _ = check_image(bytes(data))

    assert reason == "corrupt" and "broken data stream" in detail


def test_sizes_are_those_of_the_upright_image(tmp_path):
    image = Image.new("RGB", (16, 8))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)

    assert check_image(buffer.getvalue())[2:] == (8, 16)
    assert check_image(buffer.getvalue(), min_image_side=9)[0] == "too_small"


def test_worker_initializer_sets_the_parents_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)

    scan_module._init_worker(1234)

    assert Image.MAX_IMAGE_PIXELS == 1234


def test_no_pixel_limit_accepts_large_images(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    assert check_image(png_bytes(size=(300, 300)))[0] is None


# --------------------------------------------------------------------------------------------------------------
# scan_splits
# --------------------------------------------------------------------------------------------------------------


def test_hub_style_image_column_is_scanned_without_decoding_and_named_by_image_id():
    features = datasets.Features(
        {"image": datasets.Image(), "references": LOCAL_FEATURES["references"], "image_id": datasets.Value("string")}
    )
    split = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"garbage", "path": None}],
            "references": [["a"], ["b"]],
            "image_id": ["good", "bad"],
        },
        features=features,
    )

    splits, report = scan_splits({"train": split}, **quiet())

    assert splits["train"]["image_id"] == ["good"]
    [example] = report.splits["train"].examples
    assert example == {
        "index": 1,
        "image": "<image bytes>",
        "image_id": "bad",
        "reason": "not_an_image",
        "detail": example["detail"],
    }


def test_a_split_without_bad_images_is_returned_as_is(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    split = split_of([path, path])

    splits, report = scan_splits({"train": split}, **quiet())

    assert splits["train"] is split
    assert report.splits["train"].to_dict()["images_skipped"] == {}


def test_examples_are_capped_per_reason_but_every_image_is_counted(tmp_path):
    missing = [tmp_path / f"gone{i}.png" for i in range(5)]
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())

    _, report = scan_splits(
        {"train": split_of([*missing, tmp_path / "empty.png", good])}, report=DataReport(max_examples=2), **quiet()
    )

    split = report.splits["train"]
    assert split.to_dict()["images_skipped"] == {"missing": 5, "empty_file": 1}
    assert [(example["index"], example["reason"]) for example in split.examples] == [
        (0, "missing"),
        (1, "missing"),
        (5, "empty_file"),
    ]


def test_skipped_images_are_logged_with_counts_and_files(tmp_path, caplog):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())

    with caplog.at_level(logging.INFO, logger="captioning.scan"):
        scan_splits({"validation": split_of([good, tmp_path / "gone.png"])}, **quiet())

    messages = [record.getMessage() for record in caplog.records]
    assert any(
        message.startswith("validation split: skipped 1 of 2 images (missing 1); e.g. ")
        and f"{tmp_path / 'gone.png'} (missing: FileNotFoundError" in message
        for message in messages
    )
    assert any("validation split: checked 2 images" in message for message in messages)


def test_progress_bar_names_the_split(tmp_path, capsys):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())

    scan_splits({"test": split_of([good])}, **quiet(show_progress=True))

    assert "Checking test images" in capsys.readouterr().err


def test_default_workers_are_one_per_cpu(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())

    _, report = scan_splits({"train": split_of([good] * 3)}, **quiet(num_workers=None))

    assert report.settings["num_workers"] == len(os.sched_getaffinity(0))


def _die(start, sources, min_image_side):
    os._exit(3)


def test_a_worker_that_dies_stops_the_scan_naming_the_images(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    monkeypatch.setattr(scan_module, "_check_chunk", _die)

    with pytest.raises(RuntimeError, match=r"worker died .* image [01] of the train split.*--scan_images false"):
        scan_splits({"train": split_of([good] * 2)}, **quiet(num_workers=2, chunk_size=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bad_fraction": 1.5}, "--max_bad_fraction 1.5: must be between 0 and 1"),
        ({"max_bad_fraction": -0.1}, "--max_bad_fraction -0.1"),
        ({"min_image_side": 0}, "--min_image_side 0: must be at least 1"),
        ({"num_workers": -1}, "num_workers -1"),
        ({"chunk_size": 0}, "chunk_size 0"),
    ],
)
def test_bad_settings_are_errors_naming_the_flag(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        scan_splits({"train": split_of([tmp_path / "a.png"])}, **{**quiet(), **kwargs})


# --------------------------------------------------------------------------------------------------------------
# check_bad_fraction
# --------------------------------------------------------------------------------------------------------------


def scanned(total: int, skipped: int) -> SplitReport:
    split = SplitReport(images_total=total, images_kept=total - skipped, scanned=True)
    split.skipped["missing"] = skipped
    split.examples = [{"image": f"/data/{i}.jpg", "reason": "missing", "detail": "gone"} for i in range(skipped)]
    return split


def test_exactly_max_bad_fraction_is_allowed_and_more_is_not():
    check_bad_fraction(DataReport(splits={"train": scanned(100, 1)}), 0.01)

    with pytest.raises(ValueError) as error:
        check_bad_fraction(DataReport(splits={"train": scanned(100, 2), "test": scanned(10, 7)}), 0.01)

    message = str(error.value)
    assert message.startswith("Stopping before training:\n- the train split has 2 unusable image(s) out of 100 (2.00%)")
    assert "above --max_bad_fraction 0.01 (1.00%)" in message
    assert "the test split has 7 unusable image(s) out of 10 (70.00%)" in message
    assert "First ones: /data/0.jpg (missing: gone); /data/1.jpg (missing: gone).\n" in message
    assert "/data/5.jpg" not in message  # the first five only


def test_unscanned_splits_are_not_checked():
    split = scanned(10, 0)
    split.scanned = False

    check_bad_fraction(DataReport(splits={"train": split}), 0.0)


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def test_caption_stats_count_every_item_keep_few_examples_and_drop_the_source_prefix():
    stats = CaptionStats("--train_file t.csv", long_caption_words=3, max_examples=1)

    stats.note("empty", "--train_file t.csv, row 1", "")
    stats.note("empty", "--train_file t.csv, row 2", "")
    stats.note("non_utf8", "row 3 (line 4)", "b'caf\\xe9'")
    stats.note("duplicate", "--train_file t.csv, row 5", "x" * 200)

    document = stats.to_dict()
    assert document["captions_dropped"] == {"empty": 2}
    assert document["rows_skipped"] == {"non_utf8": 1}
    assert document["duplicate_captions_collapsed"] == 1
    assert document["examples"] == [
        {"reason": "empty", "where": "row 1", "value": ""},
        {"reason": "non_utf8", "where": "row 3 (line 4)", "value": "b'caf\\xe9'"},
        {"reason": "duplicate", "where": "row 5", "value": "x" * 117 + "..."},
    ]
    assert stats.is_long("one two three four") and not stats.is_long("one two three")


def test_report_file_is_written_atomically_as_sorted_json(tmp_path):
    report = DataReport()
    report.add_source("--train_file t.csv", long_caption_words=64).note("nan", "row 1", "NaN")
    report.split("train").images_total = 3

    path = write_data_report(report, tmp_path / "out")

    assert path == tmp_path / "out" / REPORT_FILE
    assert sorted(os.listdir(path.parent)) == [REPORT_FILE]  # no temporary file left behind
    document = json.loads(path.read_text())
    assert list(document) == ["settings", "sources", "splits"]
    assert document["sources"]["--train_file t.csv"]["captions_dropped"] == {"nan": 1}
    assert document["splits"]["train"]["images_total"] == 3


def test_report_of_a_real_load_lists_every_source(tmp_path):
    from captioning.arguments import DataArguments
    from captioning.data import load_caption_splits

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.png").write_bytes(png_bytes())
        (tmp_path / split / "metadata.jsonl").write_text('{"file_name": "a.png", "text": ["x", "x"]}\n')
    report = DataReport()

    load_caption_splits(
        DataArguments(dataset_dir=str(tmp_path), validation_split_percentage=0, test_split_percentage=0),
        report=report,
    )

    assert list(report.sources) == [
        f"--dataset_dir {tmp_path} (train/metadata.jsonl)",
        f"--dataset_dir {tmp_path} (test/metadata.jsonl)",
    ]
    assert all(stats.counts["duplicate"] == 1 for stats in report.sources.values())
    assert {name: split.images_total for name, split in report.splits.items()} == {"train": 1, "test": 1}
