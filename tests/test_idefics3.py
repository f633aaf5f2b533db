"""Idefics3 as a family (captioning/families/idefics3.py, SmolVLM's chat layout on Idefics3's processor): the
collator's rows are the processor's own chat-template conversations (the caption as the assistant's answer, one
<|begin_of_text|>), the loss is next-token cross-entropy over the caption and its <end_of_utterance>, generation
starts where training does, image grouping shares features (tests/test_grouping.py), --image_splitting gives each
row its tile grid's prompt and tiles, and main() trains a LoRA adapter, evaluates, captions and writes a card whose
snippet gives the same captions, with image splitting off and on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import DataArguments, LoraArguments
from captioning.families import IDEFICS3, check_image_flags, detect_family
from captioning.families.smolvlm import DEFAULT_PROMPT, conversation
from captioning.grouping import shared_image_features
from captioning.image_cache import build_image_cache
from captioning.images import load_image
from captioning.inference import load_captioner
from captioning.layout import IGNORE_INDEX
from captioning.modeling import resolve_lora_targets
from captioning.trainer import generation_inputs
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.card_snippets import explicit_snippet
from tests.conftest import tiny_run_argv
from tests.decoder_checks import (
    check_first_token_is_learnt_where_generate_predicts_it,
    check_loss_is_next_token_cross_entropy,
    sharpen,
)

NUM_IMAGE_TOKENS = 4  # the tiny checkpoint: (image 32 / patch 8)^2 / scale factor 2^2
IMAGES = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 200, 10))]
CAPTIONS = ["a red dog", "the green cat is on the grass"]  # different lengths: the first row is padded


def setup(path, prompt=None, max_caption_length=64, group_images=False, image_splitting=False):
    """Processor, family, layout and collator as a run sets them up (--image_splitting by ``image_splitting``)."""
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    family.configure_processor(processor, DataArguments(image_splitting=image_splitting))
    layout = build_layout(family, config, processor, prompt)
    collator = CaptionCollator(
        processor.image_processor, processor.tokenizer, layout, max_caption_length, group_images=group_images
    )
    return processor, family, layout, collator


def chat_encoding(processor, image, prompt, caption=None) -> dict:
    """The processor's own encoding of one conversation (generation prompt when there is no caption)."""
    return processor.apply_chat_template(
        conversation(prompt, image, caption), add_generation_prompt=caption is None, tokenize=True, return_dict=True
    )


def chat_ids(processor, image, prompt, caption=None) -> list[int]:
    return [int(i) for i in chat_encoding(processor, image, prompt, caption)["input_ids"][0]]


def training_rows(images=IMAGES, captions=CAPTIONS):
    return [{"image": image, "caption": caption} for image, caption in zip(images, captions, strict=True)]


def generation_rows(images=IMAGES):
    return [{"image": image, "image_index": i} for i, image in enumerate(images)]


# --- the family record ---------------------------------------------------------------------------------------------


def test_detected_with_its_defaults_and_language_only_lora_targets(tiny_idefics3):
    config = AutoConfig.from_pretrained(tiny_idefics3)
    assert config.model_type == "idefics3" and detect_family(config) is IDEFICS3
    assert IDEFICS3.prompt(None) == DEFAULT_PROMPT == "Describe this image in one sentence."
    assert (IDEFICS3.num_beams, IDEFICS3.max_new_tokens, IDEFICS3.min_new_tokens) == (1, 30, 0)
    assert IDEFICS3.model_class.__name__ == "Idefics3ForConditionalGeneration"
    model = IDEFICS3.model_class.from_pretrained(tiny_idefics3)
    targets = resolve_lora_targets(model, IDEFICS3, LoraArguments())
    # The SigLIP tower has q_proj / k_proj / v_proj too: only the Llama text model's are adapted.
    assert len(targets) == 7 * config.text_config.num_hidden_layers
    assert all(
        re.fullmatch(r"model\.text_model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)", name)
        for name in targets
    )
    with_vision = resolve_lora_targets(model, IDEFICS3, LoraArguments(lora_vision=True))
    vision = [name for name in with_vision if name not in targets]
    assert len(vision) == 4 * config.vision_config.num_hidden_layers
    assert all(re.fullmatch(r"model\.vision_model\.encoder\.layers\.\d\.self_attn\.\w+_proj", name) for name in vision)
    assert type(model.get_submodule(IDEFICS3.image_feature_module)).__name__ == "Idefics3Connector"


def test_image_splitting_follows_the_flag_not_what_the_checkpoint_ships(tiny_idefics3, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    config = AutoConfig.from_pretrained(tiny_idefics3)
    assert processor.image_processor.do_image_splitting is True  # as the Hub checkpoint ships
    check_image_flags(IDEFICS3, DataArguments(image_splitting=True))  # a flag Idefics3 reads
    IDEFICS3.configure_processor(processor, DataArguments())
    assert processor.image_processor.do_image_splitting is False
    layout = build_layout(IDEFICS3, config, processor)
    assert layout.grid_prompt_ids == () and layout.image_token_counts({}) is None
    pixels = CaptionCollator(processor.image_processor, processor.tokenizer, layout).pixel_values(generation_rows())
    assert pixels.shape == (2, 1, 3, 32, 32)  # one global image per picture

    IDEFICS3.configure_processor(processor, DataArguments(image_splitting=True))
    split = build_layout(IDEFICS3, config, processor)
    # The tiny checkpoint's 32-pixel tiles of images resized to 64: up to 2 x 2 tiles, or the image kept whole.
    assert [grid for grid, _ in split.grid_prompt_ids] == [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert split.prompt_ids == layout.prompt_ids == dict(split.grid_prompt_ids)[(0, 0)]
    # The saved processor (output_dir, a merged model, a push) carries the setting to inference.
    processor.save_pretrained(tmp_path / "saved")
    saved = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert saved.image_processor.do_image_splitting is True
    assert build_layout(IDEFICS3, config, saved) == split


# --- batches -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "Describe this image."])
def test_training_batch_is_the_chat_templates_conversation_with_the_caption_as_answer(tiny_idefics3, prompt):
    processor, _, layout, collator = setup(tiny_idefics3, prompt)
    text = DEFAULT_PROMPT if prompt is None else prompt
    batch = collator(training_rows())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    tok = processor.tokenizer
    bos, eou = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<end_of_utterance>"])
    length = batch["input_ids"].shape[1]
    for row, (image, caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        expected = chat_ids(processor, image, text, caption)
        prompt_ids = chat_ids(processor, image, text)
        assert expected[: len(prompt_ids)] == prompt_ids == layout.generation_prompt()
        assert expected[0] == bos and expected.count(bos) == 1  # the template's; the tokenizer adds none
        pad = length - len(expected)
        assert batch["input_ids"][row].tolist() == expected + [tok.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * pad
        # Everything before the answer and the template's newline after <end_of_utterance> are not learnt.
        answer = tok(caption, add_special_tokens=False).input_ids
        assert expected[len(prompt_ids) :] == [*answer, eou, tok.convert_tokens_to_ids("\n")]
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer + [eou] + [IGNORE_INDEX] * (1 + pad)
        assert batch["labels"][row].tolist() == labels
        # The image is the processor's, as it encodes the conversation: one global 32x32 image.
        pixels = chat_encoding(processor, image, text, caption)["pixel_values"]
        assert pixels.shape == (1, 1, 3, 32, 32)
        torch.testing.assert_close(batch["pixel_values"][row : row + 1], pixels, atol=0, rtol=0)
    assert (batch["input_ids"][0] == layout.image_token_id).sum() == NUM_IMAGE_TOKENS
    assert tok.convert_ids_to_tokens(layout.generation_prompt()[:10]) == [
        "<|begin_of_text|>",
        "User",
        ":",
        "<fake_token_around_image>",
        "<global-img>",
        *["<image>"] * NUM_IMAGE_TOKENS,
        "<fake_token_around_image>",
    ]
    assert batch["input_ids"][0, -1] == tok.pad_token_id  # the short caption is padded


def test_generation_batch_is_the_generation_prompt_and_decoding_keeps_new_tokens_only(tiny_idefics3):
    processor, _, layout, collator = setup(tiny_idefics3)
    batch = collator(generation_rows())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_index"}
    for row, image in enumerate(IMAGES):
        assert batch["input_ids"][row].tolist() == chat_ids(processor, image, DEFAULT_PROMPT)
    assert (batch["attention_mask"] == 1).all()
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
    assert set(generation_inputs(batch)) == {"pixel_values", "input_ids", "attention_mask"}
    tok = processor.tokenizer
    caption = tok("a red dog", add_special_tokens=False).input_ids
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    generated = torch.tensor([[*batch["input_ids"][0].tolist(), *caption, eou, IGNORE_INDEX]])
    assert layout.decode(generated, tok) == ["a red dog"]


def test_a_truncated_caption_keeps_its_end_of_utterance(tiny_idefics3):
    processor, _, _, collator = setup(tiny_idefics3, max_caption_length=2)
    batch = collator(training_rows())
    tok = processor.tokenizer
    learnt = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert learnt == tok.convert_tokens_to_ids(["the", "green", "<end_of_utterance>"])


def test_grouped_batches_hold_each_image_once_and_share_its_features(tiny_idefics3):
    """Idefics3 splits the connector's output per row of pixel_values inside the model, so grouped batches hand it
    each image's features as mm_encoder_outputs (equal loss and gradients: tests/test_grouping.py)."""
    _, _, layout, collator = setup(tiny_idefics3, group_images=True)
    assert layout.image_grouping and layout.grouping_by == "encoder_outputs" and collator.group_images
    rows = [{**row, "image_index": 0} for row in training_rows(IMAGES[:1] * 2)]
    batch = collator(rows)
    assert batch["image_group"].tolist() == [0, 0] and batch["pixel_values"].shape[:2] == (1, 1)


def test_the_image_cache_gives_the_pixel_values_of_the_real_size_photos(tiny_idefics3, photo_folder, tmp_path):
    """Preprocessed once (one uint8 array per image: Idefics3's longest-edge resize, then the square global image),
    the collator's pixel values equal those of the original photos, image splitting off as the layout sets it."""
    processor, _, _, collator = setup(tiny_idefics3)
    paths = sorted(str(path) for path in photo_folder.glob("photo_*"))[:5]
    split = datasets.Dataset.from_dict({"image": paths, "references": [["a"]] * 5, "image_id": paths})
    cache = build_image_cache(split, processor.image_processor, root=tmp_path, num_workers=0, show_progress=False)
    assert len(cache) == 5 and cache[0].shape == (3, 32, 32)
    rows = [{"image": load_image(path), "image_index": i} for i, path in enumerate(paths)]
    cached_rows = [{"image": cache[i], "image_index": i} for i in range(5)]
    assert torch.equal(collator(cached_rows)["pixel_values"], collator(rows)["pixel_values"])
    assert collator(rows)["pixel_values"].shape == (5, 1, 3, 32, 32)  # one image per row


# --- loss, the first generated token, beam search -------------------------------------------------------------------


def test_loss_is_next_token_cross_entropy_over_the_answer(tiny_idefics3):
    _, family, _, collator = setup(tiny_idefics3)
    model = family.model_class.from_pretrained(tiny_idefics3).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows())


def test_first_generated_token_is_what_training_teaches_at_the_last_prompt_position(tiny_idefics3):
    _, family, layout, collator = setup(tiny_idefics3)
    model = sharpen(family.model_class.from_pretrained(tiny_idefics3).eval())
    prompt = collator(generation_rows())
    check_first_token_is_learnt_where_generate_predicts_it(model, layout, collator(training_rows()), prompt)


def test_batched_beam_search_captions_each_image_as_alone(tiny_idefics3):
    """One image per row of pixel_values: beam search expands the images with their rows."""
    _, family, _, collator = setup(tiny_idefics3)
    model = sharpen(family.model_class.from_pretrained(tiny_idefics3).eval())
    settings = dict(num_beams=3, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batched = model.generate(**generation_inputs(collator(generation_rows())), **settings)
        alone = [
            model.generate(**generation_inputs(collator(generation_rows([image]))), **settings) for image in IMAGES
        ]
    assert batched[0].tolist() != batched[1].tolist()  # the two images get different captions
    for row, single in enumerate(alone):
        assert batched[row].tolist() == single[0].tolist()


# --- image splitting (--image_splitting): tiles per image, a prompt per tile grid -----------------------------------

# Resized to a longest edge of 64, then cut into 32-pixel tiles: 2 x 2, 2 x 1 and 1 x 2 tiles (+ the global image).
SPLIT_IMAGES = [
    Image.new("RGB", (50, 40), (200, 10, 10)),
    Image.new("RGB", (30, 60), (10, 200, 10)),
    Image.new("RGB", (60, 20), (10, 10, 200)),
]
SPLIT_CAPTIONS = ["a red dog", "the green cat is on the grass", "a blue ball"]
GRIDS = [(2, 2), (2, 1), (1, 2)]


def test_with_image_splitting_each_row_is_the_processors_conversation_for_its_tile_grid(tiny_idefics3):
    processor, _, layout, collator = setup(tiny_idefics3, image_splitting=True)
    batch = collator(training_rows(SPLIT_IMAGES, SPLIT_CAPTIONS))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    length = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (3, 5, 3, 32, 32)  # the most tiles of a row (2 x 2 + global) set the width
    for row, (image, caption, (rows, cols)) in enumerate(zip(SPLIT_IMAGES, SPLIT_CAPTIONS, GRIDS, strict=True)):
        encoded = chat_encoding(processor, image, DEFAULT_PROMPT, caption)
        expected = [int(i) for i in encoded["input_ids"][0]]
        prompt_ids = chat_ids(processor, image, DEFAULT_PROMPT)
        assert prompt_ids == list(dict(layout.grid_prompt_ids)[(rows, cols)])
        assert tok.convert_ids_to_tokens(prompt_ids).count(f"<row_{rows}_col_{cols}>") == 1
        assert prompt_ids.count(layout.image_token_id) == NUM_IMAGE_TOKENS * (rows * cols + 1)
        pad = length - len(expected)
        assert batch["input_ids"][row].tolist() == expected + [tok.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * pad
        answer = tok(caption, add_special_tokens=False).input_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer + [eou] + [IGNORE_INDEX] * (1 + pad)
        assert batch["labels"][row].tolist() == labels
        # The processor's tiles then global image, the rest of the row all-zero images (dropped by the model).
        tiles = rows * cols + 1
        assert encoded["pixel_values"].shape == (1, tiles, 3, 32, 32)
        torch.testing.assert_close(batch["pixel_values"][row, :tiles], encoded["pixel_values"][0], atol=0, rtol=0)
        assert (batch["pixel_values"][row, tiles:] == 0).all()
    # Same number of tiles, different grids: different prompts.
    assert batch["input_ids"][1].tolist() != batch["input_ids"][2].tolist()


def test_with_image_splitting_prompts_are_left_padded_and_batched_generation_equals_alone(tiny_idefics3):
    processor, family, layout, collator = setup(tiny_idefics3, image_splitting=True)
    batch = collator(generation_rows(SPLIT_IMAGES))
    tok = processor.tokenizer
    width = batch["input_ids"].shape[1]
    for row, image in enumerate(SPLIT_IMAGES):
        prompt = chat_ids(processor, image, DEFAULT_PROMPT)
        pad = width - len(prompt)
        assert batch["input_ids"][row].tolist() == [tok.pad_token_id] * pad + prompt
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
    assert batch["attention_mask"][0].all() and not batch["attention_mask"][1].all()
    model = sharpen(family.model_class.from_pretrained(tiny_idefics3).eval())
    settings = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batched = model.generate(**generation_inputs(batch), **settings)
        alone = []
        for image in SPLIT_IMAGES:
            single = collator(generation_rows([image]))
            alone.append(
                layout.caption_tokens(model.generate(**generation_inputs(single), **settings), single["input_ids"])
            )
    captions = layout.caption_tokens(batched, batch["input_ids"])
    assert captions[0].tolist() != captions[1].tolist()  # the images get different captions
    for row, single in enumerate(alone):
        assert captions[row].tolist() == single[0].tolist()


def test_with_image_splitting_loss_is_next_token_cross_entropy_over_the_answer(tiny_idefics3):
    _, family, _, collator = setup(tiny_idefics3, image_splitting=True)
    model = family.model_class.from_pretrained(tiny_idefics3).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows(SPLIT_IMAGES, SPLIT_CAPTIONS))


def test_with_image_splitting_grouped_loss_and_gradients_equal_ungrouped(tiny_idefics3):
    """Each image's tiles pass the vision tower once; its features (tiles and global image) serve each caption."""
    processor, family, layout, _ = setup(tiny_idefics3, image_splitting=True)
    model = family.model_class.from_pretrained(tiny_idefics3).eval()
    order = [0, 1, 0, 2, 1, 0]
    captions = ["a red dog", "the dog is red", "a man on the grass", "two blue cats", "a ball", "blue water"]
    rows = [{"image": SPLIT_IMAGES[i], "caption": captions[r], "image_index": i} for r, i in enumerate(order)]
    plain = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(rows)
    grouped = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)(rows)
    assert plain["pixel_values"].shape[:2] == (6, 5) and grouped["pixel_values"].shape[:2] == (3, 5)

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        group = batch.pop("image_group", None)
        if group is None:
            loss = model(**batch).loss
        else:
            with shared_image_features(model, batch, group, layout, None) as batch:
                loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(plain)
    grouped_loss, grouped_grads = loss_and_grads(grouped)
    torch.testing.assert_close(grouped_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == grouped_grads.keys()
    assert any(name.startswith("model.vision_model.") for name in plain_grads)  # through the tiles, too
    for name in plain_grads:
        torch.testing.assert_close(grouped_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- end to end: main() ---------------------------------------------------------------------------------------------


def run_card_snippet(code: str, image_path: Path) -> dict:
    """The snippet's variables after captioning ``image_path`` (``caption``, ``input_ids``, ...)."""
    code = re.sub(r"^image_path = .*$", f"image_path = {json.dumps(str(image_path))}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace


def predictions_of(output: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    return {line["image"]: line["prediction"] for line in lines}


@pytest.mark.slow
@pytest.mark.parametrize("image_splitting", [False, True])
def test_lora_run_trains_evaluates_predicts_and_writes_a_card(tiny_idefics3, caption_folder, tmp_path, image_splitting):
    output = tmp_path / "out"
    argv = tiny_run_argv(
        tiny_idefics3,
        caption_folder,
        output,
        eval_baseline=True,
        learning_rate=1e-2,
        max_new_tokens=6,
        image_splitting=image_splitting,
    )
    results = main(argv)
    for phase, prefix in (("baseline", "eval"), ("eval", "eval"), ("predict", "test")):
        for key in ("bleu_4", "rouge_l", "cider", "loss"):
            assert f"{prefix}_{key}" in results[phase], (phase, key)
    assert results["train"]["train_loss"] > 0
    assert results["eval"]["eval_loss"] < results["baseline"]["eval_loss"]
    settings = json.loads((output / "captioning_config.json").read_text())
    assert settings["family"] == "idefics3" and settings["caption_prompt"] == DEFAULT_PROMPT
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["target_modules"] and all("text_model" in name for name in adapter["target_modules"])
    # The saved processor cuts tiles or not as training did; the snippet and caption_images.py use it.
    assert AutoProcessor.from_pretrained(output).image_processor.do_image_splitting is image_splitting
    predictions = predictions_of(output)
    assert len(predictions) == 3 and all(isinstance(caption, str) for caption in predictions.values())
    assert any(predictions.values())  # trained at a high learning rate: not all empty
    card = (output / "README.md").read_text()
    assert "idefics3" in ModelCard(card).data.tags and "Idefics3" in card
    code = explicit_snippet(card)
    assert "Idefics3ForConditionalGeneration" in code
    # caption_images.py's captioner (adapter on its base, the saved processor's image splitting) agrees.
    images = [Image.open(caption_folder / image).convert("RGB") for image in predictions]
    assert load_captioner(output, device="cpu").caption(images) == list(predictions.values())
    processor = AutoProcessor.from_pretrained(output)
    for image, prediction in predictions.items():
        snippet = run_card_snippet(code, caption_folder / image)
        assert snippet["caption"] == prediction
        # The prompt training generated from, one <|begin_of_text|> (the template's) included.
        prompt = chat_ids(processor, Image.open(caption_folder / image).convert("RGB"), DEFAULT_PROMPT)
        assert snippet["input_ids"].tolist() == [prompt]
