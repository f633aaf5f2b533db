"""Image-grouped training: same loss and gradients as one vision pass per row, and a sampler that keeps every row."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import LoraArguments, ModelArguments
from captioning.families import detect_family
from captioning.grouping import ImageGroupedBatchSampler, shared_image_features, unique_images
from captioning.modeling import image_feature_module, load_model, vision_tower_frozen
from collators import CaptionCollator, build_layout
from tests.conftest import FAMILY_FIXTURES
from tests.family_models import lora_family_model

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
CAPTIONS = ["a red dog", "the dog is red", "a man on the grass", "two blue cats", "a ball", "blue water"]


def _rows():
    """Six caption rows of three images, images interleaved (0, 1, 0, 2, 1, 0)."""
    images = [Image.new("RGB", (36, 30), colour) for colour in COLOURS]
    order = [0, 1, 0, 2, 1, 0]
    return [{"image": images[i], "caption": CAPTIONS[row], "image_index": i} for row, i in enumerate(order)]


def test_unique_images_maps_rows_to_first_occurrences():
    first, group = unique_images([4, 7, 4, 9, 7, 4])
    assert first == [0, 1, 3]
    assert group.tolist() == [0, 1, 0, 2, 1, 0]


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_grouped_loss_and_gradients_equal_ungrouped(request, fixture):
    """Captions of one image share one pass of the image side (up to the family's image_feature_module, or the
    chat VLMs' get_image_features), repeated for each caption row: the loss and every LoRA gradient equal those of
    one image pass per row."""
    model, fam, processor, layout = lora_family_model(request.getfixturevalue(fixture))
    assert vision_tower_frozen(model, fam)
    rows = _rows()

    plain = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(rows)
    grouped = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)(rows)
    # One entry per image (Qwen's pixel_values hold all images' patches in one sequence: count their grids).
    images = "image_grid_thw" if "image_grid_thw" in plain else "pixel_values"
    assert plain[images].shape[0] == 6 and grouped[images].shape[0] == 3
    assert grouped["image_group"].tolist() == [0, 1, 0, 2, 1, 0]

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        group = batch.pop("image_group", None)
        if group is None:
            loss = model(**batch).loss
        else:
            with shared_image_features(model, batch, group, layout, image_feature_module(model, fam)) as batch:
                loss = model(**batch).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads(plain)
    grouped_loss, grouped_grads = loss_and_grads(grouped)
    torch.testing.assert_close(grouped_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == grouped_grads.keys()
    assert all(grad.abs().sum() > 0 for grad in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(grouped_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sampler_keeps_every_row_once_and_groups_captions():
    image_index = np.repeat(np.arange(7), 5)  # 7 images x 5 captions
    sampler = ImageGroupedBatchSampler(image_index, batch_size=10, captions_per_image=5, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    rows = [row for batch in batches for row in batch]
    assert sorted(rows) == list(range(35))
    # each image's five captions are consecutive, so a batch of 10 holds exactly two images
    assert [len({int(image_index[row]) for row in batch}) for batch in batches[:3]] == [2, 2, 2]

    again = ImageGroupedBatchSampler(image_index, batch_size=10, captions_per_image=5, seed=1)
    assert list(again) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches and sorted(r for b in sampler for r in b) == list(range(35))


def test_sampler_chunks_and_drop_last():
    image_index = np.repeat(np.arange(4), 6)
    sampler = ImageGroupedBatchSampler(image_index, batch_size=4, captions_per_image=2, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and all(len(batch) == 4 for batch in batches)
    for batch in batches:  # chunks of two captions of one image
        assert image_index[batch[0]] == image_index[batch[1]] and image_index[batch[2]] == image_index[batch[3]]


def test_blip_cross_attention_keys_and_values_are_computed_once_per_image(tiny_blip):
    """In a grouped batch BLIP's cross-attention key and value projections (LoRA'd here, with dropout, in training
    mode) run their frozen base on one row per image; the adapter branch still runs per caption with its own dropout
    mask, so loss and gradients equal those of the grouped batch without the sharing, draw for draw."""
    config = AutoConfig.from_pretrained(tiny_blip)
    fam = detect_family(config)
    lora = LoraArguments(lora_dropout=0.3, lora_target_modules=["query", "key", "value"])
    model = load_model(ModelArguments(model_name_or_path=str(tiny_blip)), lora, config, fam)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.train()
    processor = AutoProcessor.from_pretrained(tiny_blip)
    layout = build_layout(fam, config, processor)
    batch = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)(_rows())
    group = batch.pop("image_group")
    shared = [
        m
        for n, m in model.named_modules()
        if n.endswith(("crossattention.self.key.base_layer", "crossattention.self.value.base_layer"))
    ]
    assert shared and layout.once_per_image
    rows_seen: list[int] = []

    def loss_and_grads(run_layout):
        model.zero_grad()
        torch.manual_seed(7)
        with shared_image_features(model, dict(batch), group, run_layout, image_feature_module(model, fam)) as inputs:
            # registered after the sharing's hooks: sees the rows the base layer computes
            handles = [module.register_forward_pre_hook(lambda _m, a: rows_seen.append(len(a[0]))) for module in shared]
            loss = model(**inputs).loss
            for handle in handles:
                handle.remove()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    rows_seen.clear()
    unshared_loss, unshared_grads = loss_and_grads(dataclasses.replace(layout, once_per_image=()))
    assert set(rows_seen) == {6}  # one row per caption
    rows_seen.clear()
    shared_loss, shared_grads = loss_and_grads(layout)
    assert set(rows_seen) == {3}  # one row per image
    torch.testing.assert_close(shared_loss, unshared_loss, rtol=1e-6, atol=1e-7)
    assert any(".crossattention.self.key.lora_A" in name for name in shared_grads)
    for name in unshared_grads:
        torch.testing.assert_close(shared_grads[name], unshared_grads[name], rtol=1e-5, atol=1e-7, msg=name)
