"""--cache_image_features (captioning/feature_cache.py): the frozen image side's output computed once per image,
then fed instead of pixels. Loss and gradients equal those of the pixel path; a run with the cache ends where a run
without it does; the store is keyed, reused, and refused when the disk cannot hold it."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from captioning.arguments import LoraArguments, ModelArguments
from captioning.families import detect_family
from captioning.feature_cache import FeatureStore, build_feature_store, store_key, substituted_output, weights_digest
from captioning.grouping import shared_image_features
from captioning.modeling import image_feature_module, load_model
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.conftest import tiny_run_argv

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
CAPTIONS = ["a red dog", "the dog is red", "a man on the grass", "two blue cats", "a ball", "blue water"]


def _rows(features=None):
    images = [Image.new("RGB", (500, 375), colour) for colour in COLOURS]
    order = [0, 1, 0, 2, 1, 0]
    rows = []
    for row, i in enumerate(order):
        image = {"image": images[i]} if features is None else {"image_features": features[i]}
        rows.append({**image, "caption": CAPTIONS[row], "image_index": i})
    return rows


@pytest.fixture(scope="module")
def blip(tiny_blip):
    config = AutoConfig.from_pretrained(tiny_blip)
    family = detect_family(config)
    torch.manual_seed(0)
    model = load_model(
        ModelArguments(model_name_or_path=str(tiny_blip)), LoraArguments(lora_dropout=0.0), config, family
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_blip)
    return model, family, processor, build_layout(family, config, processor)


@pytest.mark.parametrize("grouped", [False, True])
def test_loss_and_gradients_on_cached_features_equal_the_pixel_path(blip, grouped):
    model, family, processor, layout = blip
    module = image_feature_module(model, family)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=grouped)
    pixel_rows = _rows()
    with torch.no_grad():  # the store's computation: one image at a time
        features = [module(pixel_values=collator.pixel_values([row]))[family.cached_feature][0] for row in pixel_rows]
    by_image = {row["image_index"]: feature for row, feature in zip(pixel_rows, features, strict=True)}

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        group = batch.pop("image_group", None)
        cached = batch.pop("image_features", None)
        with contextlib.ExitStack() as stack:
            if cached is not None:  # as CaptioningTrainer.fed_features does
                batch["pixel_values"] = cached.new_zeros(len(cached), 1, 1, 1)
                output = BaseModelOutputWithPooling(**{family.cached_feature: cached})
                stack.enter_context(substituted_output(module, output))
            if group is not None:
                batch = stack.enter_context(shared_image_features(model, batch, group, layout, module))
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    pixel_loss, pixel_grads = loss_and_grads(collator(pixel_rows))
    cached_batch = collator(_rows(by_image))
    assert "pixel_values" not in cached_batch and cached_batch["image_features"].shape[0] == (3 if grouped else 6)
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    cached_loss, cached_grads = loss_and_grads(cached_batch)
    handle.remove()
    assert calls == [1]  # the hooks run, the vision tower does not (its forward is replaced)
    torch.testing.assert_close(cached_loss, pixel_loss, rtol=1e-5, atol=1e-6)
    for name in pixel_grads:
        torch.testing.assert_close(cached_grads[name], pixel_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_store_is_written_once_reused_and_read_back_exactly(tmp_path, dtype):
    rows = [{"image": i} for i in range(5)]
    values = torch.randn(5, 4, 3).to(dtype)
    calls = []

    def compute(inputs):
        calls.append(len(inputs["index"]))
        return values[inputs["index"]]

    def image_inputs(batch):
        return {"index": torch.tensor([row["image"] for row in batch])}

    store = build_feature_store(rows, image_inputs, compute, folder=tmp_path / "key", batch_size=2, show_progress=False)
    assert calls == [1, 2, 2, 1] and len(store) == 5 and store.dtype == dtype  # a probe, then the batches
    assert all(torch.equal(store[i], values[i]) for i in range(5))
    again = build_feature_store(rows, image_inputs, compute, folder=tmp_path / "key", batch_size=2, show_progress=False)
    assert calls == [1, 2, 2, 1] and torch.equal(again[3], values[3])  # reused, not recomputed
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]


def test_the_key_follows_images_weights_and_precision():
    module = torch.nn.Linear(3, 2)
    first = weights_digest(module)
    assert first == weights_digest(module)
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert weights_digest(module) != first
    keys = {
        store_key("images-a", "blip", first, torch.float32),
        store_key("images-b", "blip", first, torch.float32),
        store_key("images-a", "blip", "other", torch.float32),
        store_key("images-a", "blip", first, torch.bfloat16),
    }
    assert len(keys) == 4


def test_a_store_the_disk_cannot_hold_is_refused_with_its_size(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"image features of 3 train images needs .* GiB"):
        build_feature_store(
            [{"image": 0}] * 3,
            lambda batch: {"n": len(batch)},
            lambda inputs: torch.zeros(inputs["n"], 100, 100),
            folder=tmp_path / "key",
            batch_size=2,
            show_progress=False,
            description="train images",
        )
    assert not (tmp_path / "key").exists()


@pytest.mark.slow
def test_a_run_on_cached_features_ends_where_a_run_on_pixels_does(tiny_blip, photo_folder, tmp_path, capsys):
    """Real-size photos, BLIP LoRA (vision frozen): on by default, the log says so and the stores exist; the
    training loss, validation loss and captions equal those of --cache_image_features false."""
    flags = dict(max_train_samples=8, max_eval_samples=4, max_predict_samples=4, num_train_epochs=2, seed=1)
    cached = main(
        tiny_run_argv(tiny_blip, photo_folder, tmp_path / "cached", image_cache_dir=str(tmp_path / "c"), **flags)
    )
    assert "Image features cached" in capsys.readouterr().out
    assert len(list((tmp_path / "c" / "features").iterdir())) == 2  # training and validation images
    plain = main(tiny_run_argv(tiny_blip, photo_folder, tmp_path / "plain", cache_image_features=False, **flags))
    assert "Image features cached" not in capsys.readouterr().out
    assert cached["train"]["train_loss"] == pytest.approx(plain["train"]["train_loss"], rel=1e-5)
    assert cached["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-5)
    predictions = [
        [json.loads(line)["prediction"] for line in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
        for run in ("cached", "plain")
    ]
    assert predictions[0] == predictions[1]


@pytest.mark.parametrize(
    ("fixture", "flags", "message"),
    [
        ("tiny_florence2", {}, "Florence-2 has no image feature cache yet"),
        ("tiny_blip", {"image_augmentation": "lavis"}, "--image_augmentation lavis changes the images"),
    ],
)
def test_required_where_it_cannot_apply_is_refused_before_loading(
    request, caption_folder, tmp_path, fixture, flags, message
):
    argv = tiny_run_argv(
        request.getfixturevalue(fixture), caption_folder, tmp_path / "x", cache_image_features=True, **flags
    )
    with pytest.raises(ValueError, match=message):
        main(argv)
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


def test_off_when_the_vision_side_trains_and_the_log_says_why(tiny_blip, caption_folder, tmp_path, capsys):
    main(tiny_run_argv(tiny_blip, caption_folder, tmp_path / "x", lora_vision=True, do_predict=False))
    assert "no feature cache): the image side trains" in capsys.readouterr().out


def test_a_bf16_run_keeps_bf16_features_and_the_losses_of_the_pixel_path(tiny_blip, caption_folder, tmp_path):
    flags = dict(bf16=True, use_cpu=True, num_train_epochs=2, seed=1, do_predict=False)
    cached = main(
        tiny_run_argv(tiny_blip, caption_folder, tmp_path / "a", image_cache_dir=str(tmp_path / "c"), **flags)
    )
    stores = [FeatureStore(folder) for folder in (tmp_path / "c" / "features").iterdir()]
    assert len(stores) == 2 and {store.dtype for store in stores} == {torch.bfloat16}
    plain = main(tiny_run_argv(tiny_blip, caption_folder, tmp_path / "b", cache_image_features=False, **flags))
    assert cached["train"]["train_loss"] == pytest.approx(plain["train"]["train_loss"], rel=1e-6)
    assert cached["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-6)
