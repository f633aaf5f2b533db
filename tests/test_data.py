"""Tests of captioning.data and the sources it loads: every source and layout, by-image splits, sample limits, errors
and the two views."""

from __future__ import annotations

import csv
import json
import logging
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from captioning.arguments import DataArguments
from captioning.data import CaptionImages, CaptionPairs, load_caption_splits
from captioning.scan import DataReport
from captioning.sources import hub

# --------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------------------------


def color(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 10 * i % 256, 7 * i % 256)


def make_image(path: Path, i: int = 0) -> Path:
    """An 8x8 image of one color (exact in PNG, close in JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color(i)).save(path)
    return path


def args(**kwargs) -> DataArguments:
    """DataArguments that carve nothing unless a test asks for it."""
    kwargs.setdefault("validation_split_percentage", 0)
    kwargs.setdefault("test_split_percentage", 0)
    return DataArguments(**kwargs)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ids(dataset: datasets.Dataset) -> list[str]:
    return dataset.select_columns(["image_id"])[:]["image_id"]


def refs(dataset: datasets.Dataset) -> list[list[str]]:
    return dataset.select_columns(["references"])[:]["references"]


FLICKR_NAMES = [f"{1000 + i}_{i:04x}abc.jpg" for i in range(20)]


@pytest.fixture
def flickr8k_dir(tmp_path) -> Path:
    """Flickr8k Kaggle layout: 20 images x 5 unquoted captions, some with commas."""
    root = tmp_path / "flickr8k"
    lines = ["image,caption"]
    for i, name in enumerate(FLICKR_NAMES):
        make_image(root / "Images" / name, i)
        lines.append(f"{name},A dog, brown and white, runs {i} .")
        lines += [f"{name},caption {k} of image {i}" for k in range(1, 5)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def karpathy_entry(filename, split, captions, filepath=None):
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture
def karpathy_dir(tmp_path) -> tuple[Path, Path]:
    """A COCO-style Karpathy file in one folder, its images (train2014/, val2014/) in another."""
    root, image_dir = tmp_path / "karpathy", tmp_path / "coco_images"
    entries = [
        karpathy_entry("t0.png", "train", ["train zero ", "train zero b"], "train2014"),
        karpathy_entry("v0.png", "val", ["val zero"], "val2014"),
        karpathy_entry("r0.png", "restval", ["restval zero"], "val2014"),
        karpathy_entry("s0.png", "test", ["test zero", "  "], "val2014"),
        karpathy_entry("t1.png", "train", ["train one"], "train2014"),
        karpathy_entry("s1.png", "test", ["test one"], "val2014"),
    ]
    for i, entry in enumerate(entries):
        make_image(image_dir / entry["filepath"] / entry["filename"], i)
    root.mkdir()
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}), encoding="utf-8")
    return root, image_dir


@pytest.fixture
def fake_hub(monkeypatch):
    """Install a fake ``datasets.load_dataset`` (as captioning.sources.hub looks it up) returning a DatasetDict."""
    calls = []

    def install(dataset_dict):
        def load_dataset(name, config=None, **kwargs):
            calls.append((name, config, kwargs))
            return dataset_dict

        monkeypatch.setattr(hub.datasets, "load_dataset", load_dataset)
        return calls

    return install


def hub_split(n: int, **columns) -> datasets.Dataset:
    """A Hub-like split with an ``Image()`` column of n PIL images plus the given columns."""
    features = {"image": datasets.Image()}
    for name, values in columns.items():
        is_list = isinstance(values[0], list)
        features[name] = datasets.List(datasets.Value("string")) if is_list else datasets.Value("string")
    mapping = {"image": [Image.new("RGB", (8, 8), color(i)) for i in range(n)], **columns}
    return datasets.Dataset.from_dict(mapping, features=datasets.Features(features))


# --------------------------------------------------------------------------------------------------------------
# Flickr8k layout and by-image splits
# --------------------------------------------------------------------------------------------------------------


def test_flickr8k_is_detected_and_split_by_image(flickr8k_dir):
    splits = load_caption_splits(
        args(dataset_dir=str(flickr8k_dir), validation_split_percentage=10, test_split_percentage=20)
    )

    assert list(splits) == ["train", "validation", "test"]
    assert [len(splits[s]) for s in splits] == [14, 2, 4]
    for split in splits.values():
        assert split.column_names == ["image", "references", "image_id"]
        assert all(len(r) == 5 for r in refs(split))
    all_rows = {row["image_id"]: row for split in splits.values() for row in split}
    first = all_rows[f"Images/{FLICKR_NAMES[3]}"]
    assert first["references"] == [
        "A dog, brown and white, runs 3 .",
        *[f"caption {k} of image 3" for k in range(1, 5)],
    ]
    assert first["image"] == str((flickr8k_dir / "Images" / FLICKR_NAMES[3]).resolve())


def test_flickr8k_explicit_layout_keeps_file_order_without_carving(flickr8k_dir):
    splits = load_caption_splits(args(dataset_dir=str(flickr8k_dir), dataset_layout="flickr8k"))

    assert list(splits) == ["train"]
    assert ids(splits["train"]) == [f"Images/{name}" for name in FLICKR_NAMES]


def test_split_is_deterministic_disjoint_and_keeps_train_order(flickr8k_dir):
    def split_ids(seed):
        splits = load_caption_splits(
            args(
                dataset_dir=str(flickr8k_dir),
                validation_split_percentage=20,
                test_split_percentage=20,
                split_seed=seed,
            )
        )
        return {name: ids(split) for name, split in splits.items()}

    first, again, other = split_ids(7), split_ids(7), split_ids(8)

    assert first == again
    assert first != other
    everything = [f"Images/{name}" for name in FLICKR_NAMES]
    for result in (first, other):
        sets = [set(result[name]) for name in ("train", "validation", "test")]
        assert [len(s) for s in sets] == [12, 4, 4]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert set().union(*sets) == set(everything)
        assert result["train"] == [i for i in everything if i in sets[0]]  # original order kept


def test_repeated_image_rows_never_land_in_two_splits(tmp_path):
    names = [f"img{i}.png" for i in range(12)]
    for i, name in enumerate(names):
        make_image(tmp_path / name, i)
    rows = [[name, f"caption {k} of {name}"] for k in range(3) for name in names]  # rows of an image scattered
    file = write_csv(tmp_path / "train.csv", ["image", "caption"], rows)

    splits = load_caption_splits(args(train_file=str(file), validation_split_percentage=25, test_split_percentage=25))

    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 3, 3]
    seen = [image_id for split in splits.values() for image_id in ids(split)]
    assert sorted(seen) == sorted(names)
    for split in splits.values():
        for row in split:
            assert row["references"] == [f"caption {k} of {row['image_id']}" for k in range(3)]


def _csv_with_images(tmp_path, n: int) -> Path:
    for i in range(n):
        make_image(tmp_path / f"{i}.png", i)
    return write_csv(tmp_path / "train.csv", ["image", "caption"], [[f"{i}.png", f"c{i}"] for i in range(n)])


def test_split_sizes_round_and_take_at_least_one_image(tmp_path):
    file = _csv_with_images(tmp_path, 10)

    splits = load_caption_splits(args(train_file=str(file), test_split_percentage=15, validation_split_percentage=4))

    assert {name: len(split) for name, split in splits.items()} == {"train": 7, "validation": 1, "test": 2}


def test_three_images_give_one_per_split(tmp_path):
    file = _csv_with_images(tmp_path, 3)

    splits = load_caption_splits(args(train_file=str(file), test_split_percentage=10, validation_split_percentage=10))

    assert {name: len(split) for name, split in splits.items()} == {"train": 1, "validation": 1, "test": 1}


def test_too_few_images_for_a_requested_split_is_an_error(tmp_path):
    file = _csv_with_images(tmp_path, 2)

    with pytest.raises(ValueError, match="--test_split_percentage.*--validation_split_percentage"):
        load_caption_splits(args(train_file=str(file), test_split_percentage=10, validation_split_percentage=10))


def test_percentages_leaving_no_training_image_are_an_error(tmp_path):
    file = _csv_with_images(tmp_path, 4)

    with pytest.raises(ValueError, match="too few"):
        load_caption_splits(args(train_file=str(file), test_split_percentage=50, validation_split_percentage=50))
    with pytest.raises(ValueError, match="--validation_split_percentage 100"):
        load_caption_splits(args(train_file=str(file), validation_split_percentage=100))


def test_zero_percent_means_no_split(tmp_path):
    file = _csv_with_images(tmp_path, 10)

    splits = load_caption_splits(args(train_file=str(file), test_split_percentage=0, validation_split_percentage=30))

    assert {name: len(split) for name, split in splits.items()} == {"train": 7, "validation": 3}


def test_given_validation_file_is_kept_and_only_test_is_carved(tmp_path):
    train = _csv_with_images(tmp_path, 10)
    make_image(tmp_path / "v.png")
    validation = write_csv(tmp_path / "val.csv", ["image", "caption"], [["v.png", "val caption"]])

    splits = load_caption_splits(
        args(
            train_file=str(train),
            validation_file=str(validation),
            validation_split_percentage=50,
            test_split_percentage=20,
        )
    )

    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "validation": 1, "test": 2}
    assert ids(splits["validation"]) == ["v.png"]


def test_source_without_train_split_is_not_carved(tmp_path):
    make_image(tmp_path / "v.png")
    validation = write_csv(tmp_path / "val.csv", ["image", "caption"], [["v.png", "val caption"]])

    splits = load_caption_splits(
        args(validation_file=str(validation), validation_split_percentage=10, test_split_percentage=10)
    )

    assert list(splits) == ["validation"]


# --------------------------------------------------------------------------------------------------------------
# Karpathy layout
# --------------------------------------------------------------------------------------------------------------


def test_karpathy_splits_restval_and_image_dir(karpathy_dir):
    root, image_dir = karpathy_dir

    splits = load_caption_splits(
        args(dataset_dir=str(root), image_dir=str(image_dir), validation_split_percentage=10, test_split_percentage=10)
    )

    assert ids(splits["train"]) == ["train2014/t0.png", "val2014/r0.png", "train2014/t1.png"]
    assert ids(splits["validation"]) == ["val2014/v0.png"]
    assert ids(splits["test"]) == ["val2014/s0.png", "val2014/s1.png"]
    assert refs(splits["train"]) == [["train zero", "train zero b"], ["restval zero"], ["train one"]]
    assert refs(splits["test"]) == [["test zero"], ["test one"]]
    assert splits["train"][1]["image"] == str((image_dir / "val2014" / "r0.png").resolve())


def test_karpathy_file_as_dataset_dir_with_explicit_layout(karpathy_dir):
    root, image_dir = karpathy_dir

    splits = load_caption_splits(
        args(dataset_dir=str(root / "dataset_coco.json"), dataset_layout="karpathy", image_dir=str(image_dir))
    )

    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "validation": 1, "test": 2}


def test_karpathy_without_filepath_resolves_against_dataset_dir(tmp_path):
    entries = [karpathy_entry(f"{i}.jpg", "train", [f"caption {i}"]) for i in range(3)]
    entries.append(karpathy_entry("3.jpg", "test", ["a test caption"]))
    for i in range(4):
        make_image(tmp_path / f"{i}.jpg", i)
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}), encoding="utf-8")

    splits = load_caption_splits(args(dataset_dir=str(tmp_path), validation_split_percentage=10))

    assert {name: len(split) for name, split in splits.items()} == {"train": 2, "validation": 1, "test": 1}
    assert ids(splits["test"]) == ["3.jpg"]


def test_karpathy_wrong_image_root_names_image_dir(karpathy_dir):
    root, _ = karpathy_dir

    with pytest.raises(ValueError, match="none of the first .* exists.*--image_dir"):
        load_caption_splits(args(dataset_dir=str(root)))


# --------------------------------------------------------------------------------------------------------------
# Image-folder layout
# --------------------------------------------------------------------------------------------------------------


def test_imagefolder_with_split_sub_folders(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        rows = []
        for i in range(count):
            make_image(tmp_path / split / "pics" / f"{i}.png", i)
            rows.append({"file_name": f"pics/{i}.png", "text": [f"{split} {i} a", f" {split} {i} b "]})
        write_jsonl(tmp_path / split / "metadata.jsonl", rows)

    splits = load_caption_splits(
        args(dataset_dir=str(tmp_path), validation_split_percentage=10, test_split_percentage=10)
    )

    assert {name: len(split) for name, split in splits.items()} == {"train": 4, "validation": 2, "test": 1}
    assert refs(splits["validation"]) == [["val 0 a", "val 0 b"], ["val 1 a", "val 1 b"]]
    assert splits["test"][0]["image"] == str((tmp_path / "test" / "pics" / "0.png").resolve())


def test_imagefolder_with_one_top_level_metadata_csv(tmp_path):
    rows = []
    for i in range(10):
        make_image(tmp_path / "imgs" / f"{i}.png", i)
        rows.append([f"imgs/{i}.png", f"first {i}", "" if i == 0 else f"second {i}"])
    write_csv(tmp_path / "metadata.csv", ["file_name", "caption_0", "caption_1"], rows)

    splits = load_caption_splits(
        args(
            dataset_dir=str(tmp_path),
            dataset_layout="imagefolder",
            caption_column="caption_0, caption_1",
            validation_split_percentage=20,
            test_split_percentage=10,
        )
    )

    assert {name: len(split) for name, split in splits.items()} == {"train": 7, "validation": 2, "test": 1}
    everything = {row["image_id"]: row["references"] for split in splits.values() for row in split}
    assert everything["imgs/0.png"] == ["first 0"]
    assert everything["imgs/5.png"] == ["first 5", "second 5"]


def test_undetectable_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")

    with pytest.raises(ValueError) as error:
        load_caption_splits(args(dataset_dir=str(tmp_path)))

    message = str(error.value)
    for expected in ("dataset_*.json", "captions.txt", "Images/", "metadata.jsonl", "metadata.csv", "--dataset_layout"):
        assert expected in message


def test_flickr8k_wrong_image_root_names_dataset_dir(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\nmissing.jpg,a caption\n", encoding="utf-8")

    with pytest.raises(ValueError, match="none of the first 1 images exists.*missing.jpg.*--dataset_dir"):
        load_caption_splits(args(dataset_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------------------------------
# csv / jsonl files
# --------------------------------------------------------------------------------------------------------------


def test_csv_in_sub_folder_groups_rows_and_parses_json_list_cells(tmp_path):
    folder = tmp_path / "data" / "split"
    make_image(folder / "imgs" / "a.png", 1)
    make_image(folder / "imgs" / "b.png", 2)
    absolute = make_image(tmp_path / "elsewhere" / "c.png", 3).resolve()
    rows = [
        ["imgs/a.png", "a first"],
        ["imgs/b.png", '["b one", "b two"]'],
        ["./imgs/a.png", " a second "],
        [str(absolute), "[not json, a caption]"],
    ]
    file = write_csv(folder / "train.csv", ["image_path", "caption"], rows)

    train = load_caption_splits(args(train_file=str(file)))["train"]

    assert ids(train) == ["imgs/a.png", "imgs/b.png", str(absolute)]
    assert refs(train) == [["a first", "a second"], ["b one", "b two"], ["[not json, a caption]"]]
    assert train["image"][:] == [
        str((folder / "imgs" / "a.png").resolve()),
        str((folder / "imgs" / "b.png").resolve()),
        str(absolute),
    ]


def test_jsonl_with_list_cells_and_several_caption_columns(tmp_path):
    for name in ("x.png", "y.png"):
        make_image(tmp_path / name)
    file = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"img": "x.png", "short": "x short", "long": ["x long 1", "x long 2"]},
            {"img": "y.png", "short": "y short", "long": None},
            {"img": "x.png", "short": "x again"},
        ],
    )

    train = load_caption_splits(args(train_file=str(file), image_column="img", caption_column="short,long"))["train"]

    assert ids(train) == ["x.png", "y.png"]
    assert refs(train) == [["x short", "x long 1", "x long 2", "x again"], ["y short"]]


def test_empty_captions_are_dropped_and_captionless_images_warned(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    file = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "a.png", "caption": ["  ", "kept", ""]},
            {"image": "b.png", "caption": "   "},
            {"image": "c.png", "caption": None},
        ],
    )

    with caplog.at_level(logging.WARNING, logger="captioning.sources.core"):
        train = load_caption_splits(args(train_file=str(file)))["train"]

    assert ids(train) == ["a.png"]
    assert refs(train) == [["kept"]]
    assert any("dropped 2 image(s)" in record.getMessage() for record in caplog.records)


def test_unknown_file_extension_is_an_error(tmp_path):
    file = tmp_path / "train.tsv"
    file.write_text("image\tcaption\n")

    with pytest.raises(ValueError, match=r"--train_file .*unsupported extension '\.tsv'.*\.csv.*\.jsonl"):
        load_caption_splits(args(train_file=str(file)))


def test_missing_default_column_lists_the_columns(tmp_path):
    file = write_csv(tmp_path / "train.csv", ["path", "desc"], [["a.png", "a caption"]])

    with pytest.raises(ValueError, match=r"columns: path, desc\).*--image_column"):
        load_caption_splits(args(train_file=str(file)))
    with pytest.raises(ValueError, match=r"no column 'words' \(columns: path, desc\).*--caption_column"):
        load_caption_splits(args(train_file=str(file), image_column="path", caption_column="words"))


def test_wrong_image_root_names_the_file_flag(tmp_path):
    file = write_csv(tmp_path / "sub" / "test.csv", ["image", "caption"], [["gone.png", "a caption"]])

    with pytest.raises(ValueError, match=r"--test_file .*none of the first 1 images exists.*gone\.png"):
        load_caption_splits(args(test_file=str(file)))


def test_images_are_not_opened_while_loading(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    file = write_csv(tmp_path / "train.csv", ["image", "caption"], [["broken.png", "a caption"]])

    train = load_caption_splits(args(train_file=str(file)))["train"]

    assert len(train) == 1
    with pytest.raises(OSError):
        CaptionImages(train)[0]


# --------------------------------------------------------------------------------------------------------------
# Hub datasets (load_dataset monkeypatched)
# --------------------------------------------------------------------------------------------------------------


def test_hub_splits_are_mapped_and_images_not_decoded(fake_hub, caplog):
    calls = fake_hub(
        datasets.DatasetDict(
            {
                "train": hub_split(4, captions=[[f"t{i} a", f"t{i} b"] for i in range(4)]),
                "valid": hub_split(2, captions=[["v a"], ["v b", " "]]),
                "extra": hub_split(1, captions=[["x"]]),
            }
        )
    )

    with caplog.at_level(logging.INFO, logger="captioning.sources.hub"):
        splits = load_caption_splits(
            args(dataset_name="org/captions", dataset_config_name="small", test_split_percentage=0),
            cache_dir="/cache",
        )

    assert calls == [("org/captions", "small", {"cache_dir": "/cache"})]
    assert list(splits) == ["train", "validation"]
    assert any("'extra'" in record.getMessage() for record in caplog.records)
    train = splits["train"]
    assert train.column_names == ["image", "references", "image_id"]
    assert train.features["image"] == datasets.Image(decode=False)
    assert ids(train) == ["0", "1", "2", "3"]
    assert refs(train)[2] == ["t2 a", "t2 b"]
    assert refs(splits["validation"]) == [["v a"], ["v b"]]
    assert isinstance(train[0]["image"], dict) and train[0]["image"]["bytes"]
    assert np.asarray(CaptionImages(train)[1]["image"])[0, 0].tolist() == list(color(1))


def test_hub_several_caption_columns_and_custom_image_column(fake_hub):
    split = hub_split(2, caption_0=["a0", "b0"], caption_1=["a1", ""]).rename_column("image", "picture")
    fake_hub(datasets.DatasetDict({"train": split}))

    train = load_caption_splits(
        args(dataset_name="org/x", image_column="picture", caption_column="caption_0,caption_1")
    )["train"]

    assert refs(train) == [["a0", "a1"], ["b0"]]
    assert train.features["image"] == datasets.Image(decode=False)


def test_hub_image_id_column_merges_rows_keeping_the_first_image(fake_hub):
    split = hub_split(5, caption=["a one", "b one", "a two", "c one", "b two"], image_id=["a", "b", "a", "c", "b"])
    fake_hub(datasets.DatasetDict({"train": split}))

    train = load_caption_splits(args(dataset_name="org/x", image_id_column="image_id"))["train"]

    assert ids(train) == ["a", "b", "c"]
    assert refs(train) == [["a one", "a two"], ["b one", "b two"], ["c one"]]
    pixels = [np.asarray(CaptionImages(train)[i]["image"])[0, 0].tolist() for i in range(3)]
    assert pixels == [list(color(0)), list(color(1)), list(color(3))]


def test_hub_train_only_is_carved_by_image(fake_hub):
    split = hub_split(10, caption=[f"c{i}" for i in range(10)])
    fake_hub(datasets.DatasetDict({"train": split}))

    splits = load_caption_splits(
        args(dataset_name="org/x", validation_split_percentage=20, test_split_percentage=10, split_seed=3)
    )

    assert {name: len(split) for name, split in splits.items()} == {"train": 7, "validation": 2, "test": 1}
    all_ids = [image_id for split in splits.values() for image_id in ids(split)]
    assert sorted(all_ids, key=int) == [str(i) for i in range(10)]


def test_hub_missing_column_lists_the_columns(fake_hub):
    fake_hub(datasets.DatasetDict({"train": hub_split(1, label=["x"])}))

    with pytest.raises(ValueError, match=r"split 'train'.*columns: image, label\).*--caption_column"):
        load_caption_splits(args(dataset_name="org/x"))
    with pytest.raises(ValueError, match=r"no column 'id'.*--image_id_column"):
        load_caption_splits(args(dataset_name="org/x", caption_column="label", image_id_column="id"))


# --------------------------------------------------------------------------------------------------------------
# Sources and sample limits
# --------------------------------------------------------------------------------------------------------------


def test_no_source_is_an_error():
    with pytest.raises(ValueError, match="No data source.*--dataset_name.*--dataset_dir.*--train_file"):
        load_caption_splits(args())


def test_two_sources_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="Several data sources.*--dataset_name.*--train_file"):
        load_caption_splits(args(dataset_name="org/x", train_file=str(tmp_path / "t.csv")))
    with pytest.raises(ValueError, match="Several data sources.*--dataset_name.*--dataset_dir"):
        load_caption_splits(args(dataset_name="org/x", dataset_dir=str(tmp_path)))


def test_max_samples_keep_the_first_images_with_all_captions(flickr8k_dir):
    full = load_caption_splits(
        args(dataset_dir=str(flickr8k_dir), validation_split_percentage=25, test_split_percentage=25)
    )

    limited = load_caption_splits(
        args(
            dataset_dir=str(flickr8k_dir),
            validation_split_percentage=25,
            test_split_percentage=25,
            max_train_samples=3,
            max_eval_samples=2,
            max_predict_samples=100,
        )
    )

    assert ids(limited["train"]) == ids(full["train"])[:3]
    assert ids(limited["validation"]) == ids(full["validation"])[:2]
    assert ids(limited["test"]) == ids(full["test"])
    assert all(len(r) == 5 for r in refs(limited["train"]))


def test_non_positive_max_samples_is_an_error(flickr8k_dir):
    with pytest.raises(ValueError, match="--max_eval_samples 0"):
        load_caption_splits(args(dataset_dir=str(flickr8k_dir), max_eval_samples=0))


# --------------------------------------------------------------------------------------------------------------
# CaptionPairs and CaptionImages
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_images(tmp_path) -> datasets.Dataset:
    for i in range(3):
        make_image(tmp_path / f"{i}.png", i)
    file = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "0.png", "caption": ["zero a", "zero b"]},
            {"image": "1.png", "caption": "one"},
            {"image": "2.png", "caption": ["two a", "two b", "two c"]},
        ],
    )
    return load_caption_splits(args(train_file=str(file)))["train"]


def test_caption_pairs_rows(small_images):
    pairs = CaptionPairs(small_images)

    assert len(pairs) == 6
    assert pairs.image_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert pairs.caption_index.tolist() == [0, 1, 0, 0, 1, 2]
    assert pairs.image_index.dtype == np.int64 and pairs.caption_index.dtype == np.int64
    rows = [pairs[i] for i in range(len(pairs))]
    assert [(row["caption"], row["image_index"]) for row in rows] == [
        ("zero a", 0),
        ("zero b", 0),
        ("one", 1),
        ("two a", 2),
        ("two b", 2),
        ("two c", 2),
    ]
    for row in rows:
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
        assert np.asarray(row["image"])[0, 0].tolist() == list(color(row["image_index"]))


def test_caption_images_rows_carry_no_caption(small_images):
    images = CaptionImages(small_images)

    assert len(images) == 3
    assert images.images is small_images
    assert images.references == [["zero a", "zero b"], ["one"], ["two a", "two b", "two c"]]
    assert images.image_ids == ["0.png", "1.png", "2.png"]
    for i in range(3):
        row = images[i]
        assert set(row) == {"image", "image_index"}
        assert row["image_index"] == i
        assert row["image"].mode == "RGB" and row["image"].size == (8, 8)


def test_views_survive_pickling_for_dataloader_workers(small_images):
    pairs = pickle.loads(pickle.dumps(CaptionPairs(small_images)))
    images = pickle.loads(pickle.dumps(CaptionImages(small_images)))

    assert pairs[5]["caption"] == "two c"
    assert images[2]["image_index"] == 2


# --------------------------------------------------------------------------------------------------------------
# Caption cleaning, counted per source in the DataReport (the catalogue is in test_bad_inputs.py)
# --------------------------------------------------------------------------------------------------------------


def test_flickr8k_line_that_is_not_utf8_is_skipped_and_counted(flickr8k_dir):
    captions = flickr8k_dir / "captions.txt"
    captions.write_bytes(captions.read_bytes() + f"{FLICKR_NAMES[0]},a caf\xe9 sign\n".encode("latin-1"))
    report = DataReport()

    train = load_caption_splits(args(dataset_dir=str(flickr8k_dir)), report=report)["train"]

    assert len(refs(train)[0]) == 5
    stats = report.sources[f"--dataset_dir {flickr8k_dir} (captions.txt)"]
    assert stats.counts["non_utf8"] == 1
    assert stats.examples == [
        {"reason": "non_utf8", "where": "line 102", "value": repr(b"1000_0000abc.jpg,a caf\xe9 sign")}
    ]
    assert (stats.rows, stats.images, stats.captions) == (101, 20, 100)


def test_jsonl_line_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    make_image(tmp_path / "a.png")
    file = tmp_path / "train.jsonl"
    file.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "caf\xe9"}\n')
    report = DataReport()

    train = load_caption_splits(args(train_file=str(file)), report=report)["train"]

    assert refs(train) == [["ok"]]
    assert report.sources[f"--train_file {file}"].examples[0]["where"] == "line 2"


def test_file_with_no_utf8_row_says_so(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')

    with pytest.raises(ValueError, match="the file has no rows that are UTF-8"):
        load_caption_splits(args(train_file=str(file)))


def test_csv_header_that_is_not_utf8_is_an_error(tmp_path):
    file = tmp_path / "train.csv"
    file.write_bytes(b"image,l\xe9gende\na.png,x\n")

    with pytest.raises(ValueError, match=r"--train_file .*header row is not UTF-8.*re-encode"):
        load_caption_splits(args(train_file=str(file)))


def test_malformed_csv_is_an_error_naming_the_line(tmp_path):
    file = tmp_path / "train.csv"
    file.write_bytes(b"image,caption\na.png,ok\nb.png," + b"x" * 200_000 + b"\n")  # e.g. after an unclosed quote

    with pytest.raises(ValueError, match=r"--train_file .*: not valid csv after line 2 \(field larger than"):
        load_caption_splits(args(train_file=str(file)))


def test_karpathy_duplicate_sentences_collapse_and_are_counted_per_split(karpathy_dir):
    root, image_dir = karpathy_dir
    document = json.loads((root / "dataset_coco.json").read_text())
    document["images"][0]["sentences"].append({"raw": "train zero", "tokens": ["train", "zero"]})
    (root / "dataset_coco.json").write_text(json.dumps(document))
    report = DataReport()

    splits = load_caption_splits(args(dataset_dir=str(root), image_dir=str(image_dir)), report=report)

    assert refs(splits["train"])[0] == ["train zero", "train zero b"]
    where = f"--dataset_dir {root} (dataset_coco.json)"
    assert list(report.sources) == [f"{where}, train split", f"{where}, validation split", f"{where}, test split"]
    train = report.sources[f"{where}, train split"]
    assert train.examples == [{"reason": "duplicate", "where": "images[0] (train2014/t0.png)", "value": "train zero"}]
    assert report.sources[f"{where}, test split"].counts["whitespace_only"] == 1


def test_hub_nan_none_and_duplicate_captions_are_cleaned_and_counted(fake_hub):
    split = hub_split(4, caption=["a one", "a one", "nan", "c one"], image_id=["a", "a", "b", "c"])
    fake_hub(datasets.DatasetDict({"train": split}))
    report = DataReport()

    train = load_caption_splits(args(dataset_name="org/x", image_id_column="image_id"), report=report)["train"]

    assert ids(train) == ["a", "c"]
    stats = report.sources["--dataset_name org/x (split 'train')"].to_dict()
    assert stats["duplicate_captions_collapsed"] == 1
    assert stats["captions_dropped"] == {"nan": 1}
    assert stats["images_without_captions"] == 1
    assert (stats["rows"], stats["images"], stats["captions"]) == (4, 2, 2)


def test_non_string_caption_is_an_error_naming_the_flag(tmp_path):
    make_image(tmp_path / "a.png")
    file = write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "caption": 42}])

    with pytest.raises(ValueError, match=r"line 1: a caption is a int \(42\).*--caption_column"):
        load_caption_splits(args(train_file=str(file)))


def test_split_sizes_go_into_the_report(flickr8k_dir):
    report = DataReport()

    load_caption_splits(args(dataset_dir=str(flickr8k_dir), validation_split_percentage=10), report=report)

    assert {name: (s.images_total, s.captions) for name, s in report.splits.items()} == {
        "train": (18, 90),
        "validation": (2, 10),
    }
