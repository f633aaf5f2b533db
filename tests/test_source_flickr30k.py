"""The flickr30k layout (captioning/sources/flickr30k.py) on small copies of Kaggle's download with real-size photos:
results.csv ("image_name| comment_number| comment"), flat or nested flickr30k_images/, and its broken line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioning.data import load_caption_splits
from captioning.scan import DataReport, scan_splits
from tests.photos import write_photos
from tests.source_helpers import args, ids, references


def write_flickr30k(root: Path, *, nested: bool, broken: list[str] = ()) -> list:
    """6 photos x 3 comments. nested: as Kaggle's zip has them (flickr30k_images/results.csv and the images in
    flickr30k_images/flickr30k_images/); else results.csv at the top and the images in flickr30k_images/."""
    image_dir = root / "flickr30k_images" / "flickr30k_images" if nested else root / "flickr30k_images"
    photos = write_photos(image_dir, 6)
    lines = ["image_name| comment_number| comment"]
    lines += [f"{photo.file_name}| {k}| {caption}" for photo in photos for k, caption in enumerate(photo.captions)]
    lines += broken
    results = root / "flickr30k_images" / "results.csv" if nested else root / "results.csv"
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return photos


@pytest.mark.parametrize("nested", [True, False])
def test_flickr30k_is_detected_and_read_as_one_split(tmp_path, nested):
    photos = write_flickr30k(tmp_path, nested=nested)
    folder = "flickr30k_images/flickr30k_images" if nested else "flickr30k_images"

    splits = load_caption_splits(args(tmp_path))

    assert list(splits) == ["train"]
    assert ids(splits["train"]) == [f"{folder}/{photo.file_name}" for photo in photos]
    assert references(splits) == {f"{folder}/{photo.file_name}": photo.captions for photo in photos}
    scanned, report = scan_splits(splits, num_workers=0, show_progress=False, max_bad_fraction=0)
    assert len(scanned["train"]) == 6 and report.splits["train"].images_skipped == 0


def test_flickr30k_validation_and_test_are_carved_by_image(tmp_path):
    photos = write_flickr30k(tmp_path, nested=True)

    splits = load_caption_splits(args(tmp_path, validation_split_percentage=20, test_split_percentage=20))

    assert {name: len(split) for name, split in splits.items()} == {"train": 4, "validation": 1, "test": 1}
    seen = sorted(image_id for split in splits.values() for image_id in ids(split))
    assert seen == [f"flickr30k_images/flickr30k_images/{photo.file_name}" for photo in photos]


def test_flickr30k_line_missing_its_second_separator_is_recovered_or_skipped(tmp_path, caplog):
    broken = [
        "photo_0001.jpg| 4   A dog runs across the grass .",  # the real file's defect: recovered
        "photo_0002.jpg| no number here",  # not recoverable: skipped and counted
        "photo_0003.jpg",  # no separator at all: skipped and counted
    ]
    photos = write_flickr30k(tmp_path, nested=False, broken=broken)
    report = DataReport()

    with caplog.at_level(logging.WARNING, logger="captioning.sources.flickr30k"):
        splits = load_caption_splits(args(tmp_path), report=report)

    found = references(splits)
    assert found["flickr30k_images/photo_0001.jpg"] == photos[1].captions + ["A dog runs across the grass ."]
    assert found["flickr30k_images/photo_0002.jpg"] == photos[2].captions
    assert found["flickr30k_images/photo_0003.jpg"] == photos[3].captions
    where = f"--dataset_dir {tmp_path} (results.csv)"
    stats = report.sources[where]
    assert stats.counts["malformed_row"] == 2
    assert [example["where"] for example in stats.examples] == ["line 21", "line 22"]
    assert (stats.rows, stats.images, stats.captions) == (21, 6, 19)
    messages = [record.getMessage() for record in caplog.records]
    assert f"{where}, line 21: skipped; expected 'image| number| comment', got 'photo_0002.jpg| no number here'." in (
        messages
    )
    assert (
        f"{where}: 1 row(s) lack the separator after the comment number (lines 20); their captions were recovered."
        in (messages)
    )
