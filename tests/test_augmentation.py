"""--image_augmentation lavis: the random resized crop of the BLIP / LAVIS caption recipes, on training images only,
from the decoded image (the training split is not read from the preprocessing cache)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop as TorchvisionCrop

from captioning.arguments import parse_args, validate_args
from captioning.augmentation import LAVIS_RATIO, LAVIS_SCALE, RandomResizedCrop, build_augmentation
from captioning.data import CaptionPairs
from run_captioning import main
from tests.conftest import tiny_run_argv


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 480), (1000, 200)])
def test_boxes_are_torchvisions_draw_for_draw(size):
    """The same random stream gives torchvision's RandomResizedCrop boxes (scale 0.5-1, ratio 3:4-4:3), including
    its central-crop fallback for an image too elongated for the ratio range."""
    image = Image.new("RGB", size)
    crop = RandomResizedCrop()
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, height, width = TorchvisionCrop.get_params(image, list(LAVIS_SCALE), list(LAVIS_RATIO))
        torch.manual_seed(seed)
        assert crop.box(*size) == (left, top, left + width, top + height), seed


def test_crops_cover_half_to_all_of_the_image_at_moderate_aspect_ratios():
    crop, areas = RandomResizedCrop(), []
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        left, top, right, bottom = crop.box(500, 375, generator)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        areas.append((right - left) * (bottom - top) / (500 * 375))
        assert 3 / 4 - 0.02 <= (right - left) / (bottom - top) <= 4 / 3 + 0.02
    assert min(areas) >= 0.49 and max(areas) <= 1.0
    assert 0.6 < sum(areas) / len(areas) < 0.75  # drawn uniform in 0.5-1, but more small boxes fit the image


def test_only_the_training_view_crops_and_never_a_cached_image(caption_folder):
    import datasets

    images = datasets.Dataset.from_dict(
        {"image": [str(caption_folder / "img_000.png")], "references": [["a red dog", "the dog is red"]]}
    )
    torch.manual_seed(0)
    pairs = CaptionPairs(images, augmentation=build_augmentation("lavis"))
    original = Image.open(caption_folder / "img_000.png")
    cropped = pairs[0]["image"]
    assert cropped.size != original.size and cropped.size[0] <= original.size[0]
    assert CaptionPairs(images, augmentation=build_augmentation("none"))[0]["image"].size == original.size
    with pytest.raises(ValueError, match="crops the decoded images"):
        CaptionPairs(images, cache=object(), augmentation=build_augmentation("lavis"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"image_augmentation": "flip"}, "--image_augmentation 'flip': choose one of none, lavis"),
        ({"image_augmentation": "lavis", "streaming": True}, "does not apply to --streaming"),
        ({"image_augmentation": "lavis", "training_objective": "scst"}, "drop --image_augmentation for the SCST"),
    ],
)
def test_augmentation_flags_are_checked(tiny_blip, caption_folder, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        validate_args(*parse_args(tiny_run_argv(tiny_blip, caption_folder, tmp_path / "x", **flags)))


@pytest.mark.slow
def test_a_run_with_augmentation_on_real_size_photos(tiny_blip, photo_folder, tmp_path, capsys):
    output = tmp_path / "out"
    argv = tiny_run_argv(
        tiny_blip, photo_folder, output, image_augmentation="lavis", max_train_samples=8, max_eval_samples=4,
        max_predict_samples=4, image_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    results = main(argv)
    assert results["train"]["train_loss"] > 0 and "eval_cider" in results["eval"]
    assert "training images are decoded every epoch" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the validation images' cache only
    card = (output / "README.md").read_text()
    assert "| Image augmentation | random resized crop, 50-100 % of the area" in card
    assert json.loads((output / "card_context.json").read_text())["hyperparameters"]["image_augmentation"] == "lavis"
