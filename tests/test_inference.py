"""caption_images / captioning.inference: captions of files match Captioner.caption and the trainer's predictions,
the run's prompt and generation settings apply, and unreadable images are reported and skipped."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import caption_images
from caption_images import collect_images, skipped_path
from caption_images import main as caption_main
from captioning.arguments import to_argv
from captioning.images import load_image
from captioning.inference import load_captioner
from run_captioning import main as train_main

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
CAPTIONS = {"red": "a red dog", "green": "two green cats", "blue": "a man on the beach", "yellow": "a yellow ball"}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """Eight images, two sizes per colour, each colour with its own caption: ``metadata.jsonl`` lists all of them,
    ``train.jsonl`` one per colour (both sizes look the same to a 32x32 model)."""
    root = tmp_path_factory.mktemp("colours")
    rows = []
    for size in (0, 1):
        for name, colour in COLOURS.items():
            Image.new("RGB", (32 + 8 * size, 32), colour).save(root / f"{name}_{size}.png")
            rows.append(json.dumps({"file_name": f"{name}_{size}.png", "caption": CAPTIONS[name]}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows))
    (root / "train.jsonl").write_text("".join(rows[: len(COLOURS)]))
    return root


def train(model_dir, data_dir, output_dir, **flags) -> Path:
    """Train on one image per colour and predict every image of ``data_dir`` (predictions.jsonl)."""
    defaults = dict(
        model_name_or_path=model_dir,
        train_file=data_dir / "train.jsonl",
        test_file=data_dir / "metadata.jsonl",
        output_dir=output_dir,
        do_train=True,
        do_predict=True,
        validation_split_percentage=0,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_steps=100,
        dataloader_num_workers=0,
        compute_meteor=False,
        report_to="none",
        seed=0,
    )
    train_main(to_argv(**{**defaults, **flags}))
    return output_dir


@pytest.fixture(scope="module")
def adapter_run(tiny_blip, colour_folder, tmp_path_factory) -> Path:
    """BLIP + LoRA trained with a prompt; BLIP's generation defaults (3 beams) except a short max_new_tokens."""
    output = tmp_path_factory.mktemp("adapter") / "run"
    flags = dict(num_train_epochs=2, learning_rate=1e-2, caption_prompt="a picture of ", max_new_tokens=6)
    return train(tiny_blip, colour_folder, output, **flags)


@pytest.fixture(scope="module")
def full_run(tiny_blip2_opt, colour_folder, tmp_path_factory) -> Path:
    """BLIP-2 OPT fully fine-tuned until it says each colour's caption back: captions differ per image."""
    output = tmp_path_factory.mktemp("full") / "run"
    flags = dict(num_train_epochs=40, learning_rate=5e-3, caption_prompt="a photo of ", max_new_tokens=8)
    return train(tiny_blip2_opt, colour_folder, output, use_lora=False, min_new_tokens=0, **flags)


def predictions(run: Path) -> dict[str, str]:
    lines = (run / "predictions.jsonl").read_text().splitlines()
    return {json.loads(line)["image"]: json.loads(line)["prediction"] for line in lines}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["image", "caption"]
        return list(reader)


def captions_of(captioner, paths, **overrides) -> list[str]:
    return captioner.caption([load_image(path) for path in paths], **overrides)


def test_folder_with_an_adapter_to_jsonl(adapter_run, colour_folder, tmp_path):
    output = tmp_path / "captions.jsonl"
    result = caption_main(["--model", str(adapter_run), "--images", str(colour_folder), "--output", str(output)])

    rows = read_jsonl(output)
    expected_paths = sorted(str(path) for path in colour_folder.glob("*.png"))
    assert [row["image"] for row in rows] == expected_paths  # the .jsonl files are not images
    assert set(rows[0]) == {"image", "caption"}
    assert result.skipped == [] and not skipped_path(output).exists()
    assert [row["caption"] for row in rows] == captions_of(load_captioner(adapter_run), expected_paths)
    trained = predictions(adapter_run)
    assert {Path(row["image"]).name: row["caption"] for row in rows} == trained
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask


def test_glob_with_a_full_model_to_csv(full_run, colour_folder, tmp_path):
    output = tmp_path / "captions.csv"
    caption_main(["--model", str(full_run), "--images", str(colour_folder / "*_0.png"), "--output", str(output)])

    rows = read_csv(output)
    expected_paths = sorted(str(path) for path in colour_folder.glob("*_0.png"))
    assert [row["image"] for row in rows] == expected_paths
    captions = [row["caption"] for row in rows]
    assert captions == captions_of(load_captioner(full_run), expected_paths)
    trained = predictions(full_run)
    assert captions == [trained[Path(path).name] for path in expected_paths]
    # The model tells the colours apart (an order mix-up would show) and says the training captions, prompt cut.
    assert sorted(captions) == sorted(CAPTIONS.values())


def write_unreadable_images(folder: Path, good: Path) -> None:
    shutil.copy(good, folder / 'red, "copy".png')  # csv quoting
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "readme.txt").write_text("not collected: no image extension")
    shutil.copy(good, folder / "red.png")


def test_unreadable_images_are_reported_and_skipped(full_run, colour_folder, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_unreadable_images(folder, colour_folder / "red_0.png")
    missing = str(folder / "gone.png")
    output = tmp_path / "captions.csv"
    argv = ["--model", str(full_run), "--output", str(output), "--batch_size", "2", "--num_workers", "2"]

    with caplog.at_level(logging.INFO):
        result = caption_main([*argv, "--images", str(folder), missing])

    readable = [str(folder / 'red, "copy".png'), str(folder / "red.png")]
    unreadable = {name: str(folder / name) for name in ("empty.png", "gone.png", "notes.jpg", "truncated.jpg")}
    rows = read_csv(output)
    assert [row["image"] for row in rows] == readable
    assert [row["caption"] for row in rows] == [CAPTIONS["red"], CAPTIONS["red"]]
    reasons = dict(result.skipped)
    assert sorted(reasons) == sorted(unreadable.values())
    assert reasons[unreadable["empty.png"]] == "empty file (0 bytes)"
    assert reasons[unreadable["gone.png"]] == "file not found"
    assert "truncated" in reasons[unreadable["truncated.jpg"]]
    assert "cannot identify image file" in reasons[unreadable["notes.jpg"]]

    listed = [line.split("\t") for line in skipped_path(output).read_text().splitlines()]
    assert [path for path, _ in listed] == sorted(unreadable.values())
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert all(any(path in message for message in warnings) for path in unreadable.values())
    assert any("Captioned 2 images, skipped 4 unreadable" in record.getMessage() for record in caplog.records)

    # A later run without unreadable images removes the stale list.
    caption_main([*argv, "--images", *readable, "--overwrite"])
    assert not skipped_path(output).exists()


def test_prompt_from_captioning_config_is_fed_to_generate_and_cut(adapter_run, colour_folder, tmp_path, monkeypatch):
    calls = []

    def spying_loader(*args, **kwargs):
        captioner = load_captioner(*args, **kwargs)
        generate = captioner.model.generate

        def spy(**inputs):
            sequences = generate(**inputs)
            calls.append((inputs["input_ids"].tolist(), sequences.tolist()))
            return sequences

        captioner.model.generate = spy
        return captioner

    monkeypatch.setattr(caption_images, "load_captioner", spying_loader)
    captioner = load_captioner(adapter_run)
    assert captioner.caption_prompt == "a picture of "
    tokenizer = captioner.processor.tokenizer
    bos, sep = captioner.model.config.text_config.bos_token_id, captioner.model.config.text_config.sep_token_id
    prompt_ids = tokenizer("a picture of", add_special_tokens=False)["input_ids"]
    image = colour_folder / "red_0.png"

    output = tmp_path / "captions.jsonl"
    caption_main(["--model", str(adapter_run), "--images", str(image), "--output", str(output)])
    (input_ids, sequences), *_ = calls
    assert input_ids == [[bos, *prompt_ids, sep]]
    assert all(row[: 1 + len(prompt_ids)] == [bos, *prompt_ids] for row in sequences)
    caption = read_jsonl(output)[0]["caption"]
    assert caption == tokenizer.decode(sequences[0][1 + len(prompt_ids) :], skip_special_tokens=True).strip()
    assert not caption.startswith("a picture of")

    calls.clear()
    caption_main(
        [
            "--model",
            str(adapter_run),
            "--images",
            str(image),
            "--output",
            str(output),
            "--caption_prompt",
            "",
            "--overwrite",
        ]
    )
    assert calls[0][0] == [[bos, sep]]


def test_generation_defaults_come_from_the_run_and_flags_override_them(full_run, colour_folder, tmp_path):
    captioner = load_captioner(full_run)
    run_settings = json.loads((full_run / "captioning_config.json").read_text())["generation"]
    assert captioner.generation_kwargs == run_settings
    assert run_settings["num_beams"] == 5 and run_settings["max_new_tokens"] == 8  # BLIP-2 default, run's flag
    assert captioner.generation_settings(max_new_tokens=2, num_beams=None)["max_new_tokens"] == 2
    with pytest.raises(ValueError, match="--min_new_tokens 9 exceeds max_new_tokens 8"):
        captioner.generation_settings(min_new_tokens=9)

    paths = sorted(str(path) for path in colour_folder.glob("*_1.png"))
    output = tmp_path / "short.jsonl"
    flags = ["--num_beams", "1", "--max_new_tokens", "2", "--repetition_penalty", "1.2"]
    caption_main(["--model", str(full_run), "--images", *paths, "--output", str(output), *flags])
    captions = [row["caption"] for row in read_jsonl(output)]
    assert captions == captions_of(captioner, paths, num_beams=1, max_new_tokens=2, repetition_penalty=1.2)
    assert all(1 <= len(caption.split()) <= 2 for caption in captions)  # one token per word in the tiny vocabulary
    assert captions != [predictions(full_run)[Path(path).name] for path in paths]


def test_adapter_without_processor_files_uses_the_base_processor(adapter_run, tiny_blip, colour_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "captioning_config.json"):
        shutil.copy(adapter_run / name, bare / name)
    adapter_config = json.loads((adapter_run / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "/moved/base"}))
    paths = sorted(str(path) for path in colour_folder.glob("*.png"))[:3]

    with pytest.raises(OSError, match="/moved/base.*Pass --base_model"):
        load_captioner(bare)
    moved = load_captioner(bare, base_model=str(tiny_blip))
    assert captions_of(moved, paths) == captions_of(load_captioner(adapter_run), paths)


def test_clear_errors_for_bad_output_no_images_and_bad_model(adapter_run, colour_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--output .*captions\.txt.*\.jsonl or \.csv"):
        caption_main(["--model", "never/loaded/model", "--images", str(tmp_path), "--output", "captions.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    output = str(tmp_path / "c.jsonl")
    for images in ([str(empty)], [str(tmp_path / "*.png")]):
        with pytest.raises(ValueError, match="--images .*found no images"):
            caption_main(["--model", str(adapter_run), "--images", *images, "--output", output])
    with pytest.raises(ValueError, match="neither a LoRA adapter"):
        caption_main(["--model", str(empty), "--images", str(colour_folder), "--output", output])
    (empty / "red.png").write_bytes(b"")
    with pytest.raises(ValueError, match="--min_new_tokens 5 exceeds --max_new_tokens 2"):
        caption_main(
            ["--model", str(empty), "--images", str(empty), "--output", output]
            + ["--max_new_tokens", "2", "--min_new_tokens", "5"]
        )


def test_collect_images_from_folders_globs_and_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "c.txt", ".hidden.png", "sub/d.webp"):
        (tmp_path / name).write_bytes(b"")
    root = str(tmp_path)

    assert collect_images([root]) == [f"{root}/a.JPG", f"{root}/b.png"]
    assert collect_images([root], recursive=True) == [f"{root}/a.JPG", f"{root}/b.png", f"{root}/sub/d.webp"]
    assert collect_images([f"{root}/**/*.webp"], recursive=True) == [f"{root}/sub/d.webp"]
    # duplicates collapse; a file named explicitly is taken whatever its extension
    assert collect_images([f"{root}/b.png", root, f"{root}/c.txt"]) == [
        f"{root}/a.JPG",
        f"{root}/b.png",
        f"{root}/c.txt",
    ]
