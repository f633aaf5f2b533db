"""The flickr8k layout (captioning/sources/flickr8k.py) on small copies with real-size photos: the original
distribution (Flickr8k.token.txt, official split lists, Flicker8k_Dataset/) and Kaggle's csv captions.txt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioning.data import load_caption_splits
from captioning.scan import DataReport, scan_splits
from tests.photos import write_photos
from tests.source_helpers import args, ids, references

EXTRA = ["a photo", "a picture"]  # with the three captions of tests/photos.py: five per image, as in Flickr8k
GHOST = "2258277193_586949ec62.jpg.1"  # the real token file captions an image that does not exist


def write_original(root: Path, *, text_dir: str = "Flickr8k_text", image_dir: str = "Flicker8k_Dataset") -> list:
    """8 photos with 5 captions each (#0..#4) and a caption of the ghost image, as Flickr8k.token.txt writes them."""
    photos = write_photos(root / image_dir, 8)
    lines = [
        f"{photo.file_name}#{k}\t{caption}" for photo in photos for k, caption in enumerate(photo.captions + EXTRA)
    ]
    lines.insert(15, f"{GHOST}#0\tA dog runs .")  # after the lines of the first three photos
    (root / text_dir).mkdir(parents=True, exist_ok=True)
    (root / text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return photos


def write_split_lists(folder: Path, names: dict[str, list[str]]) -> None:
    files = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for split, file_name in files.items():
        (folder / file_name).write_text("".join(f"{name}\n" for name in names[split]), encoding="utf-8")


@pytest.fixture
def original(tmp_path) -> tuple[Path, list]:
    """The original archives unpacked: Flickr8k_text/ (token file, split lists) and Flicker8k_Dataset/."""
    root = tmp_path / "flickr8k"
    photos = write_original(root)
    names = [photo.file_name for photo in photos]
    # photo 7 and the ghost are in no list, as 92 images of the real token file are
    write_split_lists(root / "Flickr8k_text", {"train": names[:4], "dev": [names[5], names[4]], "test": [names[6]]})
    return root, photos


def test_original_split_lists_are_honoured_and_unlisted_images_left_out(original, caplog):
    root, photos = original
    report = DataReport()

    with caplog.at_level(logging.INFO, logger="captioning.sources"):
        splits = load_caption_splits(
            args(root, validation_split_percentage=20, test_split_percentage=20), report=report
        )

    image_ids = [f"Flicker8k_Dataset/{photo.file_name}" for photo in photos]
    assert {name: ids(split) for name, split in splits.items()} == {
        "train": image_ids[:4],
        "validation": image_ids[4:6],  # token-file order, not list order
        "test": [image_ids[6]],
    }
    assert references(splits) == {image_ids[i]: photos[i].captions + EXTRA for i in range(7)}
    assert splits["test"][0]["image"] == str((root / "Flicker8k_Dataset" / photos[6].file_name).resolve())
    messages = [record.getMessage() for record in caplog.records]
    assert f"--dataset_dir {root}: detected the flickr8k layout." in messages
    where = f"--dataset_dir {root} (Flickr8k_text/Flickr8k.token.txt)"
    assert f"{where}: left out 2 image(s) that are in none of the split lists." in messages
    stats = report.sources[where]
    assert (stats.rows, stats.images, stats.captions) == (41, 9, 41)


def test_original_images_are_real_files(original):
    root, _ = original
    splits = load_caption_splits(args(root))

    scanned, report = scan_splits(splits, num_workers=0, show_progress=False, max_bad_fraction=0)

    assert {name: len(split) for name, split in scanned.items()} == {"train": 4, "validation": 2, "test": 1}
    assert {name: entry.images_skipped for name, entry in report.splits.items()} == {
        "train": 0,
        "validation": 0,
        "test": 0,
    }


def test_original_without_split_lists_is_all_train_and_the_ghost_is_a_missing_image(tmp_path):
    photos = write_original(tmp_path, text_dir=".", image_dir="Flickr8k_Dataset")

    splits = load_caption_splits(args(tmp_path))

    assert list(splits) == ["train"]
    image_ids = [f"Flickr8k_Dataset/{photo.file_name}" for photo in photos]
    assert ids(splits["train"]) == image_ids[:3] + [f"Flickr8k_Dataset/{GHOST}"] + image_ids[3:]
    scanned, report = scan_splits(splits, num_workers=0, show_progress=False, max_bad_fraction=0.2)
    assert ids(scanned["train"]) == image_ids
    assert report.splits["train"].skipped == {"missing": 1}


def test_original_without_split_lists_is_carved_by_percentage(tmp_path):
    write_original(tmp_path, image_dir="Images")

    splits = load_caption_splits(args(tmp_path, validation_split_percentage=20, test_split_percentage=20))

    assert {name: len(split) for name, split in splits.items()} == {"train": 5, "validation": 2, "test": 2}


def test_original_token_line_that_is_not_utf8_is_skipped_and_counted(original):
    root, photos = original
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_bytes(token.read_bytes() + f"{photos[0].file_name}#5\ta caf\xe9 sign\n".encode("latin-1"))
    report = DataReport()

    splits = load_caption_splits(args(root), report=report)

    assert splits["train"][0]["references"] == photos[0].captions + EXTRA
    stats = report.sources[f"--dataset_dir {root} (Flickr8k_text/Flickr8k.token.txt)"]
    assert stats.counts["non_utf8"] == 1
    assert stats.examples == [
        {"reason": "non_utf8", "where": "line 42", "value": repr(b"photo_0000.jpg#5\ta caf\xe9 sign")}
    ]


def test_original_image_in_two_split_lists_is_an_error(original):
    root, photos = original
    (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").write_text(f"{photos[0].file_name}\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"photo_0000\.jpg is in both Flickr_8k\.trainImages\.txt and "):
        load_caption_splits(args(root))


def test_original_token_line_without_tab_is_an_error_naming_the_line(tmp_path):
    write_original(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "photo_0000.jpg#5 no tab here\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt\), line 42: expected '<image>#<n><TAB><caption>'"):
        load_caption_splits(args(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# Kaggle: captions.txt as csv
# --------------------------------------------------------------------------------------------------------------


def test_kaggle_quoted_captions_lose_their_quotes_and_unquoted_commas_are_kept(tmp_path):
    photos = write_photos(tmp_path / "Images", 6)
    names = [photo.file_name for photo in photos]
    lines = [
        "image,caption",
        f'{names[0]},"A child , in pink , climbs ."',
        f'{names[1]},"A sign reads ""stop"" ."',
        f"{names[2]},A dog, brown and white, runs .",
        f'{names[3]},A man says "hi" , then leaves .',
        f"{names[4]},A plain caption .",
        f'{names[5]},"Quoted, with a comma"',
        f"{names[5]},  spaces around  ",
    ]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    splits = load_caption_splits(args(tmp_path))

    assert list(splits) == ["train"]
    assert references(splits) == {
        f"Images/{names[0]}": ["A child , in pink , climbs ."],
        f"Images/{names[1]}": ['A sign reads "stop" .'],
        f"Images/{names[2]}": ["A dog, brown and white, runs ."],
        f"Images/{names[3]}": ['A man says "hi" , then leaves .'],
        f"Images/{names[4]}": ["A plain caption ."],
        f"Images/{names[5]}": ["Quoted, with a comma", "spaces around"],
    }
    scanned, _ = scan_splits(splits, num_workers=0, show_progress=False, max_bad_fraction=0)
    assert len(scanned["train"]) == 6


def test_kaggle_line_without_caption_field_is_an_error_naming_the_line(tmp_path):
    write_photos(tmp_path / "Images", 1)
    (tmp_path / "captions.txt").write_text("image,caption\nphoto_0000.jpg,ok\nphoto_0000.jpg\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"\(captions\.txt\), line 3: expected 'image,caption', got 'photo_0000\.jpg'"):
        load_caption_splits(args(tmp_path))


def test_original_wins_over_kaggle_when_both_are_there(original):
    root, photos = original
    (root / "Images").mkdir()
    (root / "captions.txt").write_text(f"image,caption\n{photos[0].file_name},kaggle\n", encoding="utf-8")

    splits = load_caption_splits(args(root))

    assert ids(splits["train"])[0] == f"Flicker8k_Dataset/{photos[0].file_name}"
