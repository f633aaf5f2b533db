"""The layout registry (captioning/sources/__init__.py): detection picks each layout from its files alone, the
"could not detect" error and the README list every layout's rule, and --dataset_layout offers every layout."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from captioning.arguments import DataArguments
from captioning.data import load_caption_splits
from captioning.sources import LAYOUTS, coco, detect_layout, flickr8k, flickr30k, imagefolder, karpathy, layout_names

ROOT = Path(__file__).resolve().parents[1]


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def karpathy_files(root: Path) -> None:
    touch(root / "dataset_flickr8k.json", json.dumps({"images": [], "dataset": "flickr8k"}))


def coco_files(root: Path) -> None:
    touch(root / "annotations" / "captions_val2017.json", "{}")


def flickr30k_files(root: Path) -> None:
    touch(root / "flickr30k_images" / "results.csv")
    (root / "flickr30k_images" / "flickr30k_images").mkdir()


def flickr8k_kaggle_files(root: Path) -> None:
    touch(root / "captions.txt")
    (root / "Images").mkdir()


def flickr8k_original_files(root: Path) -> None:
    touch(root / "Flickr8k_text" / "Flickr8k.token.txt")
    (root / "Flicker8k_Dataset").mkdir()


def imagefolder_files(root: Path) -> None:
    touch(root / "val" / "metadata.csv")


@pytest.mark.parametrize(
    "write, expected",
    [
        (karpathy_files, karpathy),
        (coco_files, coco),
        (flickr30k_files, flickr30k),
        (flickr8k_kaggle_files, flickr8k),
        (flickr8k_original_files, flickr8k),
        (imagefolder_files, imagefolder),
    ],
)
def test_each_layout_is_detected_by_its_own_rule_only(tmp_path, write, expected):
    write(tmp_path)

    assert detect_layout(tmp_path) is expected
    assert [layout.NAME for layout in LAYOUTS if layout.detect(tmp_path)] == [expected.NAME]


def test_karpathy_split_file_is_detected_first(tmp_path):
    karpathy_files(tmp_path)
    flickr8k_original_files(tmp_path)

    assert detect_layout(tmp_path) is karpathy


def test_json_without_images_list_is_not_a_karpathy_file(tmp_path):
    touch(tmp_path / "dataset_info.json", json.dumps({"features": {}}))
    flickr8k_kaggle_files(tmp_path)

    assert detect_layout(tmp_path) is flickr8k


def test_undetectable_folder_lists_every_layout_and_its_rule(tmp_path):
    touch(tmp_path / "notes.txt", "nothing here")

    with pytest.raises(ValueError) as error:
        load_caption_splits(DataArguments(dataset_dir=str(tmp_path)))

    message = str(error.value)
    assert message.startswith(
        f"--dataset_dir {tmp_path}: could not detect the dataset layout. Looked for, in this order:"
    )
    rules = "; ".join(f"{layout.NAME}: {layout.DETECTION}" for layout in LAYOUTS)
    assert rules in message
    assert message.endswith("set --dataset_layout to one of karpathy, coco, flickr30k, flickr8k, imagefolder.")


def test_layout_named_explicitly_but_absent_says_what_it_needs(tmp_path):
    flickr8k_kaggle_files(tmp_path)

    with pytest.raises(ValueError) as error:
        load_caption_splits(DataArguments(dataset_dir=str(tmp_path), dataset_layout="coco"))

    assert str(error.value) == (
        f"--dataset_dir {tmp_path}: not in the coco layout, which needs {coco.DETECTION}. Fix --dataset_dir, or set "
        "--dataset_layout auto (or another layout)."
    )


def test_dataset_layout_choices_are_the_registered_layouts():
    field = next(f for f in fields(DataArguments) if f.name == "dataset_layout")

    assert field.metadata["choices"][0] == "auto"
    assert sorted(field.metadata["choices"][1:]) == sorted(layout_names())
    assert layout_names() == ["karpathy", "coco", "flickr30k", "flickr8k", "imagefolder"]


def test_readme_table_lists_every_layout_with_its_detection_rule():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")

    for layout in LAYOUTS:
        row = f"| `{layout.NAME}` | {layout.DETECTION} | `python run_captioning.py "
        assert row in readme, f"README.md has no table row for the {layout.NAME} layout with its DETECTION text"
