"""--streaming: parquet and webdataset shards streamed in one and two processes; shards loaded without streaming."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioning.arguments import CaptioningTrainingArguments, DataArguments, parse_args, to_argv, validate_args
from captioning.data import load_caption_splits
from captioning.streaming import expand_and_decode, load_streaming_splits
from run_captioning import load_data, main

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
NAMES = ["red", "green", "blue", "yellow"]


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _image(shard: int, i: int) -> tuple[bytes, list[str]]:
    k = (shard * 6 + i) % 4
    return _jpeg(COLOURS[k]), [f"a {NAMES[k]} square", f"the square is {NAMES[k]}"]


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parquet")
    for shard in range(4):
        images, captions = zip(*(_image(shard, i) for i in range(6)), strict=True)
        table = pa.table({"image": [{"bytes": b, "path": None} for b in images], "caption": list(captions)})
        pq.write_table(table, folder / f"train-{shard:03d}.parquet")
    return folder


@pytest.fixture(scope="module")
def webdataset_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wds")
    for shard in range(4):
        with tarfile.open(folder / f"train-{shard:03d}.tar", "w") as tar:
            for i in range(6):
                image, captions = _image(shard, i)
                if shard == 1 and i == 2:
                    image = image[: len(image) // 3]  # a truncated JPEG in the middle of a shard
                for suffix, payload in (("jpg", image), ("txt", captions[0].encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i:03d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def _flags(output: Path, train_file: str, **extra) -> list[str]:
    flags = dict(
        model_name_or_path=extra.pop("model"),
        train_file=train_file,
        streaming=True,
        output_dir=output,
        do_train=True,
        do_eval=True,
        max_steps=6,
        max_eval_samples=4,
        test_split_percentage=0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        shuffle_buffer_size=8,
        save_strategy="no",
        eval_strategy="no",
        max_new_tokens=4,
        num_beams=1,
        dataloader_num_workers=0,
        compute_meteor=False,
    )
    flags.update(extra)
    return to_argv(**flags)


def test_streams_parquet_shards(tiny_blip, parquet_shards, tmp_path):
    output = tmp_path / "out"
    results = main(_flags(output, str(parquet_shards / "train-*.parquet"), model=tiny_blip))
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert results["eval"]["eval_samples"] == 4  # the first four images of the stream, held out
    assert results["train"]["train_loss"] > 0


def test_streams_webdataset_shards_skipping_a_bad_image_in_workers(tiny_blip, webdataset_shards, tmp_path, capsys):
    output = tmp_path / "out"
    results = main(_flags(output, str(webdataset_shards / "train-*.tar"), model=tiny_blip, dataloader_num_workers=2))
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
    assert results["eval"]["eval_samples"] == 4
    assert "Process 0 of 1 streams 4 of 4 shards" in capsys.readouterr().out


def test_a_bad_image_in_the_stream_is_skipped_not_fatal():
    good, captions = _image(0, 0)
    rows = expand_and_decode(
        {
            "image": [{"bytes": good[:50], "path": None}, {"bytes": good, "path": None}],
            "references": [captions, ["x"]],
            "image_id": ["bad", "good"],
        }
    )
    assert rows["caption"] == ["x"] and len(rows["image"]) == 1
    assert rows["image"][0].mode == "RGB"


def test_held_out_images_are_not_trained_on(parquet_shards):
    args = DataArguments(
        train_file=str(parquet_shards / "train-*.parquet"),
        streaming=True,
        max_eval_samples=5,
        max_predict_samples=3,
        shuffle_buffer_size=4,
    )
    train, held_out = load_streaming_splits(args, seed=0)
    assert len(held_out["validation"]) == 5 and len(held_out["test"]) == 3
    held_ids = set(held_out["validation"]["image_id"]) | set(held_out["test"]["image_id"])
    assert len(held_ids) == 8
    captions_trained = [row["caption"] for row in train]
    assert len(captions_trained) == (24 - 8) * 2  # every other image, both captions each


def test_two_processes_each_stream_their_own_shards(tiny_blip, webdataset_shards, tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(ROOT / "run_captioning.py"),
        *_flags(output, str(webdataset_shards / "train-*.tar"), model=tiny_blip, log_level_replica="info"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert re.search(r"Process 0 of 2 streams 2 of 4 shards", log)
    assert re.search(r"Process 1 of 2 streams 2 of 4 shards", log)
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
    assert json.loads((output / "eval_results.json").read_text())["eval_samples"] == 4


def test_shards_load_without_streaming_too(parquet_shards, webdataset_shards):
    splits = load_caption_splits(
        DataArguments(
            train_file=str(parquet_shards / "train-*.parquet"), validation_split_percentage=0, test_split_percentage=0
        )
    )
    assert len(splits["train"]) == 24 and splits["train"][0]["references"] == ["a red square", "the square is red"]
    splits = load_caption_splits(
        DataArguments(
            train_file=str(webdataset_shards / "train-*.tar"), validation_split_percentage=25, test_split_percentage=0
        )
    )
    assert len(splits["train"]) + len(splits["validation"]) == 24
    assert splits["train"].features["image"].decode is False


@pytest.fixture(scope="module")
def shards_with_a_bad_head(tmp_path_factory) -> Path:
    """Two parquet shards; the second image of the stream is a truncated JPEG, so it is held out for validation."""
    folder = tmp_path_factory.mktemp("bad-head")
    for shard in range(2):
        images, captions = zip(*(_image(shard, i) for i in range(6)), strict=True)
        images = list(images)
        if shard == 0:
            images[1] = images[1][: len(images[1]) // 3]
        table = pa.table({"image": [{"bytes": b, "path": None} for b in images], "caption": list(captions)})
        pq.write_table(table, folder / f"train-{shard:03d}.parquet")
    return folder


def test_in_memory_validation_images_are_scanned_like_any_split(shards_with_a_bad_head, tmp_path):
    output = tmp_path / "out"
    flags = _flags(output, str(shards_with_a_bad_head / "train-*.parquet"), model="unused", max_bad_fraction=0.3)
    splits = load_data(parse_args(flags))
    assert len(splits["validation"]) == 3 and "1" not in splits["validation"]["image_id"]  # image 1 left out
    assert isinstance(splits["train"], datasets.IterableDataset)
    report = json.loads((output / "data_report.json").read_text())["splits"]
    assert report["validation"]["images_skipped"] == {"truncated": 1} and report["validation"]["images_total"] == 4
    with pytest.raises(ValueError, match=r"validation split has 1 unusable image\(s\) out of 4.*--max_bad_fraction"):
        load_data(parse_args(_flags(tmp_path / "strict", str(shards_with_a_bad_head / "train-*.parquet"), model="m")))


def test_several_processes_refuse_epoch_strategies_before_anything_loads(tmp_path, monkeypatch):
    def validate(**extra):
        flags = _flags(tmp_path / "out", "shards/train-*.tar", model="m", **extra)
        validate_args(*parse_args(flags))

    validate(eval_strategy="epoch", save_strategy="epoch")  # one process: every process sees the whole stream
    monkeypatch.setattr(CaptioningTrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(
        ValueError,
        match=r"--streaming with 2 processes cannot use --eval_strategy epoch and --save_strategy epoch .*"
        r"end of its shards at a different step\. Pass --eval_strategy steps --eval_steps N and --save_strategy steps",
    ):
        validate(eval_strategy="epoch", save_strategy="epoch")
    with pytest.raises(ValueError, match=r"cannot use --save_strategy epoch \("):
        validate(eval_strategy="no", save_strategy="epoch")
    validate(eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    validate(eval_strategy="no", save_strategy="no")
