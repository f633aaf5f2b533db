#!/usr/bin/env python
"""Build the offline demo: a small BLIP that captions in a generic style, and a dataset of another domain.

    python demo/build_demo.py            # writes demo/build/{model,data} (about 80 s on 2 CPU cores)

Both are generated deterministically from seeds, with no download:
- photos of coloured shapes ("stickers") at various sizes and places, drawn with PIL and saved as 320x240 JPEGs
  (a tenth of them stored sideways with an EXIF orientation tag, as phones do), so that a run decodes, turns upright
  and resizes them (to the model's 32x32 input) as it does real photos;
- ``demo/build/pretrain``: the same kind of images with generic captions ("a red circle on a white background"),
  on which a tiny BLIP is pre-trained from scratch by this repository's own run_captioning.py (full fine-tuning):
  that is the demo's "pretrained captioner", ``demo/build/model``;
- ``demo/build/data``: the domain dataset, new images with shop-catalogue captions of their own style
  ("large red round sticker on white paper, left side"), three references per image, one folder with
  metadata.jsonl that run_captioning.py splits by image.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioning.arguments import to_argv  # noqa: E402
from captioning.tiny_models import build_tiny_blip  # noqa: E402

logger = logging.getLogger("build_demo")

IMAGE_SIZE = 32  # the model's input: the processor resizes each photo to 32x32
PHOTO_SIZE = (320, 240)  # what the demo's files are (width, height): JPEGs of a realistic size
SCALE = (PHOTO_SIZE[0] / IMAGE_SIZE, PHOTO_SIZE[1] / IMAGE_SIZE)  # layout below is in 32x32 units
ROTATED_EVERY = 10  # every tenth photo is stored sideways with EXIF orientation 6 (rotate 90 degrees to view)
EXIF_ORIENTATION = 0x0112
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
PLACES = ("left", "right", "top", "bottom", "centre")

# Generic captions: how the pre-trained model learns to speak (COCO-like, varied).
GENERIC_TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape}",
    "a picture of a {colour} {shape} on the {place}",
    "there is a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} in the {place} of the picture",
    "a photo of a {colour} {shape} sticker",
    "a {shape} on {background} paper",
    "a {round} {colour} shape on the {place} side",
)
# Domain captions: a shop's catalogue style, which the demo teaches with LoRA.
DOMAIN_TEMPLATES = (
    "{size} {colour} {round} sticker on {background} paper , {place} side",
    "{colour} {round} sticker , {size} , {background} paper",
    "sticker : {size} {colour} {round} , {place} side of {background} paper",
)
ROUND = {"circle": "round", "square": "square", "triangle": "triangular"}

WORDS = sorted(
    {word for template in GENERIC_TEMPLATES + DOMAIN_TEMPLATES for word in template.split() if "{" not in word}
    | set(COLOURS)
    | set(BACKGROUNDS)
    | set(SHAPES)
    | set(SIZES)
    | set(PLACES)
    | set(ROUND.values())
    | {":", ","}
)


def draw(spec: dict, rng: random.Random) -> Image.Image:
    """One sticker on a plain background with a little sensor grain (so JPEG sizes and decoding are photo-like),
    as a PHOTO_SIZE photo; position and colour jitter a little. The layout is planned in the model's 32x32 units
    and scaled up."""
    sx, sy = SCALE
    radius = 6 if spec["size"] == "small" else 11
    centre = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "centre": (16, 16)}[spec["place"]]
    cx, cy = (c + rng.randint(-1, 1) for c in centre)
    if spec["size"] == "large":
        cx, cy = (min(max(c, radius - 2), IMAGE_SIZE - radius + 2) for c in (cx, cy))
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[spec["colour"]])
    x, y, r = cx * sx, cy * sy, radius * min(sx, sy)  # round shapes stay round in the photo
    box = (round(x - r), round(y - r), round(x + r), round(y + r))
    image = Image.new("RGB", PHOTO_SIZE, BACKGROUNDS[spec["background"]])
    canvas = ImageDraw.Draw(image)
    if spec["shape"] == "circle":
        canvas.ellipse(box, fill=colour)
    elif spec["shape"] == "square":
        canvas.rectangle(box, fill=colour)
    else:
        left, top, right, bottom = box
        canvas.polygon([((left + right) // 2, top), (left, bottom), (right, bottom)], fill=colour)
    grain = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, size=(*PHOTO_SIZE[::-1], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def save_photo(image: Image.Image, path: Path, sideways: bool) -> None:
    """A JPEG (quality 90); ``sideways``: stored rotated with EXIF orientation 6, so it shows upright in a viewer."""
    if not sideways:
        image.save(path, quality=90)
        return
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)


def random_spec(rng: random.Random) -> dict:
    return {
        "colour": rng.choice(list(COLOURS)),
        "background": rng.choice(list(BACKGROUNDS)),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(SIZES),
        "place": rng.choice(PLACES),
    }


def captions(spec: dict, templates: tuple[str, ...], rng: random.Random, count: int) -> list[str]:
    values = dict(spec, round=ROUND[spec["shape"]])
    chosen = rng.sample(templates, k=min(count, len(templates)))
    return [template.format(**values) for template in chosen]


def write_dataset(folder: Path, num_images: int, templates: tuple[str, ...], seed: int, per_image: int) -> None:
    """An image folder of JPEG photos with metadata.jsonl (``file_name``, ``caption``: list of references)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for i in range(num_images):
            spec = random_spec(rng)
            name = f"sticker_{i:05d}.jpg"
            save_photo(draw(spec, rng), folder / name, sideways=i % ROTATED_EVERY == ROTATED_EVERY - 1)
            metadata.write(json.dumps({"file_name": name, "caption": captions(spec, templates, rng, per_image)}) + "\n")


def pretrain(build: Path, seed: int) -> Path:
    """Pre-train a tiny BLIP on generic captions with run_captioning.py itself (full fine-tuning from scratch)."""
    from run_captioning import main

    init = build_tiny_blip(build / "init", WORDS, hidden=64, layers=2, image_size=IMAGE_SIZE, patch_size=8, seed=seed)
    run_dir = build / "pretrain-run"
    argv = to_argv(
        model_name_or_path=init,
        dataset_dir=build / "pretrain",
        validation_split_percentage=0,
        test_split_percentage=0,
        use_lora=False,
        do_train=True,
        output_dir=run_dir,
        num_train_epochs=15,
        learning_rate=2e-3,
        warmup_steps=20,
        lr_scheduler_type="cosine",
        per_device_train_batch_size=64,
        save_strategy="no",
        logging_steps=50,
        dataloader_num_workers=0,
        seed=seed,
        report_to="none",
    )
    main(argv)
    model_dir = build / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    run_records = ("all_results.json", "train_results.json", "trainer_state.json", "training_args.bin")
    for path in run_dir.iterdir():
        if path.is_file() and path.name not in run_records:
            shutil.copy2(path, model_dir / path.name)
    shutil.rmtree(run_dir)
    shutil.rmtree(init)
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build_dir", default=str(ROOT / "demo" / "build"))
    parser.add_argument("--pretrain_images", type=int, default=3000)
    parser.add_argument("--domain_images", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="Rebuild even if demo/build/model exists.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    build = Path(args.build_dir)
    if (build / "model" / "config.json").is_file() and (build / "data" / "metadata.jsonl").is_file() and not args.force:
        logger.info("Demo already built in %s (use --force to rebuild).", build)
        return
    shutil.rmtree(build, ignore_errors=True)
    write_dataset(build / "pretrain", args.pretrain_images, GENERIC_TEMPLATES, seed=args.seed + 1, per_image=3)
    write_dataset(build / "data", args.domain_images, DOMAIN_TEMPLATES, seed=args.seed + 2, per_image=3)
    model_dir = pretrain(build, args.seed)
    shutil.rmtree(build / "pretrain")
    logger.info("Demo model: %s; demo data: %s", model_dir, build / "data")


if __name__ == "__main__":
    main()
