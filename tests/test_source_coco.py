"""The coco layout (captioning/sources/coco.py) on a small copy of COCO as downloaded, with real-size photos:
annotations/captions_{train,val}2017.json, train2017/, val2017/; --coco_val_as; 2014 next to 2017."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from captioning.data import load_caption_splits
from captioning.scan import DataReport, scan_splits
from tests.photos import write_photos
from tests.source_helpers import args, ids, references

TRAIN_IDS = [9, 25, 30, 34, 36]  # 36 has no caption
VAL_IDS = [139, 285, 632]


def file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def captions(image_id: int, year: str) -> list[str]:
    return [f"image {image_id} of {year}, caption {k}" for k in range(5)]


def write_part(root: Path, part: str, year: str, image_ids: list[int], captionless: tuple[int, ...] = ()) -> None:
    """Photos in <part><year>/ named as COCO names them, and annotations/captions_<part><year>.json."""
    folder = root / f"{part}{year}"
    for photo, image_id in zip(write_photos(folder, len(image_ids), png_every=0), image_ids, strict=True):
        (folder / photo.file_name).rename(folder / file_name(image_id))
    images = [{"id": i, "file_name": file_name(i), "height": 480, "width": 640} for i in image_ids]
    annotations = [
        {"image_id": i, "id": 1000 * i + k, "caption": caption}
        for i in image_ids
        if i not in captionless
        for k, caption in enumerate(captions(i, year))
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    document = {"info": {"year": int(year)}, "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{part}{year}.json").write_text(json.dumps(document), encoding="utf-8")


@pytest.fixture
def coco(tmp_path) -> Path:
    write_part(tmp_path, "train", "2017", TRAIN_IDS, captionless=(36,))
    write_part(tmp_path, "val", "2017", VAL_IDS)
    return tmp_path


def expected(part: str, image_ids: list[int], year: str = "2017") -> dict[str, list[str]]:
    return {f"{part}{year}/{file_name(i)}": captions(i, year) for i in image_ids}


def test_train_and_val_files_become_train_and_validation(coco):
    report = DataReport()

    splits = load_caption_splits(args(coco), report=report)

    assert {name: ids(split) for name, split in splits.items()} == {
        "train": list(expected("train", TRAIN_IDS[:4])),
        "validation": list(expected("val", VAL_IDS)),
    }
    assert references(splits) == expected("train", TRAIN_IDS[:4]) | expected("val", VAL_IDS)
    assert splits["validation"][0]["image"] == str((coco / "val2017" / file_name(139)).resolve())
    train = report.sources[f"--dataset_dir {coco} (annotations/captions_train2017.json)"].to_dict()
    assert (train["rows"], train["images"], train["captions"], train["images_without_captions"]) == (20, 4, 20, 1)
    scanned, scan_report = scan_splits(splits, num_workers=0, show_progress=False, max_bad_fraction=0)
    assert {name: len(split) for name, split in scanned.items()} == {"train": 4, "validation": 3}
    assert sum(entry.images_skipped for entry in scan_report.splits.values()) == 0


def test_missing_test_split_is_carved_from_train(coco):
    splits = load_caption_splits(args(coco, test_split_percentage=25))

    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "validation": 3, "test": 1}
    assert sorted(ids(splits["train"]) + ids(splits["test"])) == list(expected("train", TRAIN_IDS[:4]))


def test_coco_val_as_test_carves_validation_from_train_by_image(coco):
    splits = load_caption_splits(args(coco, coco_val_as="test", validation_split_percentage=25))

    assert ids(splits["test"]) == list(expected("val", VAL_IDS))
    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "validation": 1, "test": 3}
    assert sorted(ids(splits["train"]) + ids(splits["validation"])) == list(expected("train", TRAIN_IDS[:4]))


def test_2017_is_used_when_2014_is_there_too(coco, caplog):
    write_part(coco, "train", "2014", [1, 2, 3])
    write_part(coco, "val", "2014", [4])

    with caplog.at_level(logging.INFO, logger="captioning.sources.coco"):
        splits = load_caption_splits(args(coco))

    assert references(splits) == expected("train", TRAIN_IDS[:4]) | expected("val", VAL_IDS)
    assert f"--dataset_dir {coco}: has COCO 2017 and 2014; using 2017." in [r.getMessage() for r in caplog.records]


def test_2014_alone(tmp_path):
    write_part(tmp_path, "train", "2014", [1, 2, 3])
    write_part(tmp_path, "val", "2014", [4])

    splits = load_caption_splits(args(tmp_path))

    assert references(splits) == expected("train", [1, 2, 3], "2014") | expected("val", [4], "2014")


def test_caption_of_an_unknown_image_id_is_skipped_and_counted(coco, caplog):
    path = coco / "annotations" / "captions_val2017.json"
    document = json.loads(path.read_text())
    document["annotations"].insert(2, {"image_id": 777, "id": 1, "caption": "an image nobody listed"})
    path.write_text(json.dumps(document))
    report = DataReport()

    with caplog.at_level(logging.WARNING, logger="captioning.sources.coco"):
        splits = load_caption_splits(args(coco), report=report)

    assert references({"validation": splits["validation"]}) == expected("val", VAL_IDS)
    where = f"--dataset_dir {coco} (annotations/captions_val2017.json)"
    stats = report.sources[where]
    assert stats.counts["unknown_image"] == 1
    assert stats.examples == [{"reason": "unknown_image", "where": "annotations[2]", "value": "777"}]
    assert f"{where}: skipped 1 caption(s) whose image_id is not in 'images' (e.g. 777)." in [
        record.getMessage() for record in caplog.records
    ]


def test_file_that_is_not_coco_format_is_an_error_naming_it(coco):
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": []}))

    with pytest.raises(ValueError, match=r"\(annotations/captions_val2017\.json\): expected a COCO captions file"):
        load_caption_splits(args(coco))


def test_unknown_coco_val_as_is_an_error(coco):
    with pytest.raises(ValueError, match="--coco_val_as 'train': use validation or test"):
        load_caption_splits(args(coco, coco_val_as="train"))
