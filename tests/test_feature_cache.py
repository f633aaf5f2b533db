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

from captioning.data import cached_image
from captioning.feature_cache import FeatureFeed, FeatureStore, build_feature_store, store_key, weights_digest
from captioning.grouping import shared_image_features
from captioning.modeling import frozen_image_side, image_feature_module, image_side_modules
from captioning.trainer import generation_inputs
from collators import CaptionCollator
from run_captioning import main
from tests.conftest import FAMILY_FIXTURES, tiny_run_argv
from tests.family_models import lora_family_model

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
SIZES = [(500, 375), (375, 500), (640, 480)]  # real photo sizes; Qwen gives each its own number of tokens
CAPTIONS = ["a red dog", "the dog is red", "a man on the grass", "two blue cats", "a ball", "blue water"]
ORDER = [0, 1, 0, 2, 1, 0]


def _images():
    return [Image.new("RGB", size, colour) for size, colour in zip(SIZES, COLOURS, strict=True)]


def _rows(store=None):
    """Six caption rows of three images (0, 1, 0, 2, 1, 0): the images, or their records in ``store``."""
    images = _images()
    rows = []
    for row, i in enumerate(ORDER):
        image = {"image": images[i]} if store is None else cached_image(store, i)
        rows.append({**image, "caption": CAPTIONS[row], "image_index": i})
    return rows


def _store(feed, collator, folder):
    """The three images' features, through a real store (one image per batch, as a run with batch size 1)."""
    store = build_feature_store(
        [{"image": image} for image in _images()],
        collator.processed_images,
        feed.records,
        folder=folder,
        batch_size=1,
        show_progress=False,
    )
    feed.structure = store.structure
    return store


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_loss_and_gradients_on_cached_features_equal_the_pixel_path(request, tmp_path, fixture, grouped):
    """Every family, with and without image grouping: a batch that feeds the stored features gives the loss and
    every LoRA gradient of the same batch on pixels, and the vision tower does not run."""
    model, family, processor, layout = lora_family_model(request.getfixturevalue(fixture))
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=grouped)
    feed = FeatureFeed(model, family, layout)
    store = _store(feed, collator, tmp_path / "store")
    feature_module = image_feature_module(model, family)

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        group = batch.pop("image_group", None)
        with contextlib.ExitStack() as stack:
            if "image_features" in batch:  # as CaptioningTrainer.fed_features does
                batch, group = stack.enter_context(feed.fed(batch, group))
            if group is not None:
                batch = stack.enter_context(shared_image_features(model, batch, group, layout, feature_module))
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    pixel_loss, pixel_grads = loss_and_grads(collator(_rows()))
    cached_batch = collator(_rows(store))
    assert "pixel_values" not in cached_batch and len(cached_batch["image_features"]) == (3 if grouped else 6)
    vision = model.get_base_model().get_submodule(family.vision_prefix.rstrip("."))
    calls = []
    layers = [module for module in vision.modules() if module is not vision]  # BLIP's tower itself: hooks only
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    cached_loss, cached_grads = loss_and_grads(cached_batch)
    for handle in handles:
        handle.remove()
    assert layers and calls == []  # no layer of the vision tower ran
    torch.testing.assert_close(cached_loss, pixel_loss, rtol=1e-5, atol=1e-6)
    assert cached_grads.keys() == pixel_grads.keys()
    for name in pixel_grads:
        torch.testing.assert_close(cached_grads[name], pixel_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_beam_search_on_cached_features_writes_what_it_writes_on_pixels(request, tmp_path, fixture):
    """``generate`` with 2 beams expands the stand-in pixels per beam; the features it is handed follow."""
    model, family, processor, layout = lora_family_model(request.getfixturevalue(fixture))
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout)
    feed = FeatureFeed(model, family, layout)
    store = _store(feed, collator, tmp_path / "store")
    rows = [{"image": image, "image_index": i} for i, image in enumerate(_images())]
    settings = dict(num_beams=2, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        on_pixels = model.generate(**generation_inputs(collator(rows)), **settings)
        cached = collator([{**cached_image(store, i), "image_index": i} for i in range(3)])
        with feed.fed(cached, None) as (cached, _):
            on_features = model.generate(**generation_inputs(cached), **settings)
    assert torch.equal(on_features, on_pixels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_store_is_written_once_reused_and_read_back_exactly(tmp_path, dtype):
    """Records of named tensors whose first axis differs from image to image (Qwen's tokens per image) and an
    integer input kept with them come back exactly, with each image's placeholder count."""
    rows = [{"image": i} for i in range(5)]
    features = [torch.randn(2 + i, 3).to(dtype) for i in range(5)]
    layers = [torch.randn(2 + i, 3).to(dtype) for i in range(5)]
    calls = []

    def image_inputs(batch):
        index = [row["image"] for row in batch]
        return {"index": torch.tensor(index)}, [(i, i + 1) for i in index]

    def compute(inputs):
        calls.append(len(inputs["index"]))
        records = [
            {"pooler_output": features[i], "deepstack.0": layers[i], "grid": torch.tensor([[1, i, i]])}
            for i in inputs["index"].tolist()
        ]
        return records, {"pooler_output": "per_image"}

    def build():
        return build_feature_store(
            rows, image_inputs, compute, folder=tmp_path / "key", batch_size=2, show_progress=False
        )

    store = build()
    assert calls == [1, 2, 2, 1] and len(store) == 5  # a probe, then the batches
    assert store.structure == {"pooler_output": "per_image"}
    for i in range(5):
        record = store[i]
        assert record["pooler_output"].dtype == dtype and torch.equal(record["pooler_output"], features[i])
        assert torch.equal(record["deepstack.0"], layers[i]) and record["grid"].tolist() == [[1, i, i]]
        assert store.image_token_count(i) == (i, i + 1)
    again = build()
    assert calls == [1, 2, 2, 1] and torch.equal(again[3]["pooler_output"], features[3])  # reused, not recomputed
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
            lambda batch: ({"n": len(batch)}, None),
            lambda inputs: ([{"pooler_output": torch.zeros(100, 100)}] * inputs["n"], {}),
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
        ("tiny_florence2", {"training_objective": "scst"}, "--training_objective scst samples from the images"),
        ("tiny_blip", {"image_augmentation": "lavis"}, "--image_augmentation lavis changes the images"),
        ("tiny_qwen2_5_vl", {"lora_vision": True}, "the image side trains"),
        ("tiny_paligemma", {"use_lora": False}, "the image side trains"),
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


@pytest.mark.parametrize(
    ("fixture", "flags"),
    [
        ("tiny_blip", {"lora_vision": True}),
        # Full fine-tuning with the vision tower frozen still trains BLIP-2's Q-Former and projection.
        ("tiny_blip2_opt", {"use_lora": False, "freeze_vision_tower": True}),
    ],
)
def test_off_when_the_image_side_trains_and_the_log_says_why(request, caption_folder, tmp_path, capsys, fixture, flags):
    path = request.getfixturevalue(fixture)
    main(tiny_run_argv(path, caption_folder, tmp_path / "x", do_predict=False, max_new_tokens=2, **flags))
    assert "no feature cache): the image side trains" in capsys.readouterr().out


def test_a_bf16_run_keeps_bf16_features_and_the_losses_of_the_pixel_path(tiny_blip, caption_folder, tmp_path):
    flags = dict(bf16=True, use_cpu=True, num_train_epochs=2, seed=1, do_predict=False)
    cached = main(
        tiny_run_argv(tiny_blip, caption_folder, tmp_path / "a", image_cache_dir=str(tmp_path / "c"), **flags)
    )
    stores = [FeatureStore(folder) for folder in (tmp_path / "c" / "features").iterdir()]
    assert len(stores) == 2 and {store.fields["last_hidden_state"][0] for store in stores} == {torch.bfloat16}
    plain = main(tiny_run_argv(tiny_blip, caption_folder, tmp_path / "b", cache_image_features=False, **flags))
    assert cached["train"]["train_loss"] == pytest.approx(plain["train"]["train_loss"], rel=1e-6)
    assert cached["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixture", "flags"),
    [
        ("tiny_qwen2_5_vl", {}),  # each photo at its own size: records of different lengths, grids kept with them
        ("tiny_smolvlm", {"image_splitting": True}),  # a tile grid per image: the placeholder counts kept too
        ("tiny_blip2_t5", {"num_beams": 2}),  # generate() runs the tower, the Q-Former and the projection itself
    ],
)
def test_a_family_run_on_cached_features_ends_where_a_run_on_pixels_does(
    request, photo_folder, tmp_path, capsys, fixture, flags
):
    """Real-size photos through main(): on by default for the family, and the training loss, validation loss and
    captions equal those of --cache_image_features false."""
    path = request.getfixturevalue(fixture)
    flags = dict(max_train_samples=6, max_eval_samples=3, max_predict_samples=2, seed=1, max_new_tokens=3, **flags)
    cache = str(tmp_path / "c")
    cached = main(tiny_run_argv(path, photo_folder, tmp_path / "cached", image_cache_dir=cache, **flags))
    assert "Image features cached" in capsys.readouterr().out
    assert len(list((tmp_path / "c" / "features").iterdir())) == 2  # training and validation images
    plain = main(tiny_run_argv(path, photo_folder, tmp_path / "plain", cache_image_features=False, **flags))
    assert "Image features cached" not in capsys.readouterr().out
    assert cached["train"]["train_loss"] == pytest.approx(plain["train"]["train_loss"], rel=1e-5)
    assert cached["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-5)
    assert cached["eval"]["eval_cider"] == plain["eval"]["eval_cider"]
    predictions = [
        [json.loads(line)["prediction"] for line in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
        for run in ("cached", "plain")
    ]
    assert predictions[0] == predictions[1]


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_the_image_side_is_every_module_outside_the_language_side(request, fixture):
    """image_side_modules: with the language model and the output layer, they hold every parameter of the model
    (BLIP-2's query tokens, a bare parameter, aside); the vision tower is one of them. Under LoRA all are frozen."""
    model, family, _, _ = lora_family_model(request.getfixturevalue(fixture))
    base = model.get_base_model()
    side = image_side_modules(model, family)
    inside = {id(p) for module in side for p in module.parameters()}
    language = {id(p) for name, p in base.named_parameters() if name.startswith((family.language_prefix, "lm_head."))}
    rest = [name for name, p in base.named_parameters() if id(p) not in inside | language]
    assert rest == (["query_tokens"] if family.name.startswith("blip2") else [])
    assert base.get_submodule(family.vision_prefix.rstrip(".")) in side
    assert frozen_image_side(model, family) == side


def test_a_grouped_batch_reads_each_image_once_from_the_store(tiny_blip, tmp_path):
    """Caption rows carry a reference to their image's record; the collator reads the records it needs: one per
    distinct image of a grouped batch, one per row otherwise."""
    model, family, processor, layout = lora_family_model(tiny_blip)
    feed = FeatureFeed(model, family, layout)
    store = _store(feed, CaptionCollator(processor.image_processor, processor.tokenizer, layout), tmp_path / "s")
    reads = []

    class CountingStore(FeatureStore):
        def __getitem__(self, index):
            reads.append(int(index))
            return super().__getitem__(index)

    counting = CountingStore(store.folder)
    for grouped, expected in ((True, [0, 1, 2]), (False, ORDER)):
        reads.clear()
        collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=grouped)
        batch = collator(_rows(counting))
        assert reads == expected and len(batch["image_features"]) == len(expected)


def test_off_under_a_sharded_engine_that_accelerate_launch_configured(tiny_blip, caption_folder, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` tells the run through the environment
    (ACCELERATE_USE_FSDP; a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED, not installed here), before any Trainer
    exists: the features would be computed by weights about to be sharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    argv = tiny_run_argv(tiny_blip, caption_folder, tmp_path / "x", cache_image_features=True)
    with pytest.raises(ValueError, match="DeepSpeed and FSDP shard the weights"):
        main(argv)
