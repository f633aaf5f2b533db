"""SmolVLM2 as a family (captioning/families/smolvlm.py): the collator's rows are the processor's own chat-template
conversations (the caption as the assistant's answer), the loss is next-token cross-entropy over the caption and
its <end_of_utterance>, generation starts where training does, image grouping shares features (tests/test_grouping.py).
With --image_splitting each image's tiles get their own prompt, still the processor's own, and a run captions at
inference as in training. The end-to-end runs of the chat families are tests/test_chat_runs.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

import caption_images
from captioning.arguments import DataArguments, LoraArguments, ModelArguments
from captioning.families import SMOLVLM, detect_family
from captioning.families.smolvlm import DEFAULT_PROMPT, conversation
from captioning.grouping import shared_image_features
from captioning.image_cache import build_image_cache
from captioning.images import load_image
from captioning.inference import load_captioner
from captioning.layout import IGNORE_INDEX
from captioning.modeling import load_model, resolve_lora_targets
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
from tests.test_chat_runs import predictions, run_card_snippet

NUM_IMAGE_TOKENS = 4  # the tiny checkpoint: (image 32 / patch 8)^2 / scale factor 2^2
IMAGES = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 200, 10))]
CAPTIONS = ["a red dog", "the green cat is on the grass"]  # different lengths: the first row is padded


def setup(path, prompt=None, max_caption_length=64, group_images=False):
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    layout = build_layout(family, config, processor, prompt)
    collator = CaptionCollator(
        processor.image_processor, processor.tokenizer, layout, max_caption_length, group_images=group_images
    )
    return processor, family, layout, collator


def chat_ids(processor, image, prompt, caption=None) -> list[int]:
    """The processor's own token ids of one conversation (generation prompt when there is no caption)."""
    encoded = processor.apply_chat_template(
        conversation(prompt, image, caption), add_generation_prompt=caption is None, tokenize=True, return_dict=True
    )
    return [int(i) for i in encoded["input_ids"][0]]


def training_rows(images=IMAGES, captions=CAPTIONS):
    return [{"image": image, "caption": caption} for image, caption in zip(images, captions, strict=True)]


def generation_rows(images=IMAGES):
    return [{"image": image, "image_index": i} for i, image in enumerate(images)]


# --image_splitting: the tiny checkpoint's 32-pixel tiles, of images first resized to a longest edge of 64.
SPLIT_EDGE = 64


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """An image whose tiles all differ (plain colours would give equal tiles)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# A wide image is cut into 1 x 2 tiles, a tall one into 2 x 1, a square one into 2 x 2 (each plus its global image).
SPLIT_IMAGES = [noise((60, 20), 0), noise((20, 60), 1), noise((40, 40), 2)]
SPLIT_GRIDS = [(1, 2), (2, 1), (2, 2)]
SPLIT_CAPTIONS = ["a red dog", "the green cat is on the grass", "a blue ball"]


def split_processor(processor):
    """``processor`` set up as ``--image_splitting`` does, images resized to SPLIT_EDGE first."""
    processor.image_processor.size = {"longest_edge": SPLIT_EDGE}
    SMOLVLM.configure_processor(processor, DataArguments(image_splitting=True))
    return processor


def split_setup(path, group_images=False):
    processor = split_processor(AutoProcessor.from_pretrained(path))
    layout = build_layout(SMOLVLM, AutoConfig.from_pretrained(path), processor)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=group_images)
    return processor, layout, collator


# --- the family record ---------------------------------------------------------------------------------------------


def test_detected_with_its_defaults_and_language_only_lora_targets(tiny_smolvlm):
    config = AutoConfig.from_pretrained(tiny_smolvlm)
    assert detect_family(config) is SMOLVLM
    assert SMOLVLM.prompt(None) == DEFAULT_PROMPT == "Describe this image in one sentence."
    assert (SMOLVLM.num_beams, SMOLVLM.max_new_tokens, SMOLVLM.min_new_tokens) == (1, 30, 0)
    model = SMOLVLM.model_class.from_pretrained(tiny_smolvlm)
    targets = resolve_lora_targets(model, SMOLVLM, LoraArguments())
    # The SigLIP tower has q_proj / k_proj / v_proj too: only the text model's are adapted.
    assert len(targets) == 7 * config.text_config.num_hidden_layers
    assert all(name.startswith("model.text_model.layers.") for name in targets)
    with_vision = resolve_lora_targets(model, SMOLVLM, LoraArguments(lora_vision=True))
    vision = [name for name in with_vision if name not in targets]
    assert len(vision) == 4 * config.vision_config.num_hidden_layers
    assert all(re.fullmatch(r"model\.vision_model\.encoder\.layers\.\d\.self_attn\.\w+_proj", name) for name in vision)
    model.get_submodule(SMOLVLM.image_feature_module)  # exists


def test_shipped_lora_config_loads_with_the_family_defaults():
    from captioning.arguments import parse_args

    config = Path(__file__).resolve().parents[1] / "configs" / "smolvlm2_500m_lora.yaml"
    model, data, lora, caption, training = parse_args(["--config", str(config), "--use_cpu", "true"])
    assert model.model_name_or_path == "HuggingFaceTB/SmolVLM2-500M-Video-Instruct" and lora.lora_target_modules is None
    assert SMOLVLM.prompt(data.caption_prompt) == DEFAULT_PROMPT
    assert (caption.num_beams, caption.max_new_tokens, caption.min_new_tokens) == (1, 30, 0)
    assert training.bf16


def test_image_splitting_follows_the_flag_not_what_the_checkpoint_ships(tiny_smolvlm, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    config = AutoConfig.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = True  # as the Hub checkpoints ship
    SMOLVLM.configure_processor(processor, DataArguments())
    assert processor.image_processor.do_image_splitting is False
    layout = build_layout(SMOLVLM, config, processor)
    assert layout.grid_prompt_ids == () and layout.image_token_counts({}) is None
    pixels = CaptionCollator(processor.image_processor, processor.tokenizer, layout).pixel_values(generation_rows())
    assert pixels.shape == (2, 1, 3, 32, 32)  # one global image per picture

    split_processor(processor)
    split = build_layout(SMOLVLM, config, processor)
    # The tiny checkpoint's 32-pixel tiles of images resized to 64: up to 2 x 2 tiles, or the image kept whole.
    assert [grid for grid, _ in split.grid_prompt_ids] == [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert split.prompt_ids == layout.prompt_ids == dict(split.grid_prompt_ids)[(0, 0)]
    # The saved processor (output_dir, a merged model, a push) carries the setting to inference.
    processor.save_pretrained(tmp_path / "saved")
    saved = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert saved.image_processor.do_image_splitting is True
    assert build_layout(SMOLVLM, config, saved) == split


def test_a_processor_that_cannot_cut_tiles_is_refused_naming_the_flag(tiny_smolvlm):
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.max_image_size = {"height": 32, "width": 32}
    with pytest.raises(ValueError, match=r"--image_splitting: .*longest_edge.*leave --image_splitting out"):
        SMOLVLM.configure_processor(processor, DataArguments(image_splitting=True))


# --- batches -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "Describe this image."])
def test_training_batch_is_the_chat_templates_conversation_with_the_caption_as_answer(tiny_smolvlm, prompt):
    processor, _, layout, collator = setup(tiny_smolvlm, prompt)
    text = DEFAULT_PROMPT if prompt is None else prompt
    batch = collator(training_rows())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    length = batch["input_ids"].shape[1]
    for row, (image, caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        expected = chat_ids(processor, image, text, caption)
        prompt_ids = chat_ids(processor, image, text)
        assert expected[: len(prompt_ids)] == prompt_ids == layout.generation_prompt()
        pad = length - len(expected)
        assert batch["input_ids"][row].tolist() == expected + [tok.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * pad
        # Everything before the answer and the template's newline after <end_of_utterance> are not learnt.
        answer = tok(caption, add_special_tokens=False).input_ids
        assert expected[len(prompt_ids) :] == [*answer, eou, tok.convert_tokens_to_ids("\n")]
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer + [eou] + [IGNORE_INDEX] * (1 + pad)
        assert batch["labels"][row].tolist() == labels
    assert (batch["input_ids"][0] == layout.image_token_id).sum() == NUM_IMAGE_TOKENS
    assert batch["input_ids"][0, -1] == tok.pad_token_id  # the short caption is padded
    # One image per row, as the processor lays out one image per conversation.
    encoded = processor.image_processor(images=[[image] for image in IMAGES], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], encoded, atol=0, rtol=0)


def test_generation_batch_is_the_generation_prompt_and_decoding_keeps_new_tokens_only(tiny_smolvlm):
    processor, _, layout, collator = setup(tiny_smolvlm)
    batch = collator(generation_rows())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_index"}
    for row, image in enumerate(IMAGES):
        assert batch["input_ids"][row].tolist() == chat_ids(processor, image, DEFAULT_PROMPT)
    assert (batch["attention_mask"] == 1).all()
    assert set(generation_inputs(batch)) == {"pixel_values", "input_ids", "attention_mask"}
    tok = processor.tokenizer
    caption = tok("a red dog", add_special_tokens=False).input_ids
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    generated = torch.tensor([[*batch["input_ids"][0].tolist(), *caption, eou, IGNORE_INDEX]])
    assert layout.decode(generated, tok) == ["a red dog"]


def test_a_truncated_caption_keeps_its_end_of_utterance(tiny_smolvlm):
    processor, _, _, collator = setup(tiny_smolvlm, max_caption_length=2)
    batch = collator(training_rows())
    tok = processor.tokenizer
    learnt = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert learnt == tok.convert_tokens_to_ids(["the", "green", "<end_of_utterance>"])


def test_grouped_batches_hold_each_image_once_and_share_its_features(tiny_smolvlm):
    """SmolVLM splits the connector's output per row of pixel_values inside the model, so grouped batches hand it
    each image's features as mm_encoder_outputs (equal loss and gradients: tests/test_grouping.py)."""
    _, _, layout, collator = setup(tiny_smolvlm, group_images=True)
    assert layout.image_grouping and layout.grouping_by == "encoder_outputs" and collator.group_images
    rows = [{**row, "image_index": 0} for row in training_rows(IMAGES[:1] * 2)]
    batch = collator(rows)
    assert batch["image_group"].tolist() == [0, 0] and batch["pixel_values"].shape[:2] == (1, 1)


# --- loss and the first generated token -----------------------------------------------------------------------------


def test_loss_is_next_token_cross_entropy_over_the_answer(tiny_smolvlm):
    _, family, _, collator = setup(tiny_smolvlm)
    model = family.model_class.from_pretrained(tiny_smolvlm).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows())


def test_first_generated_token_is_what_training_teaches_at_the_last_prompt_position(tiny_smolvlm):
    _, family, layout, collator = setup(tiny_smolvlm)
    model = sharpen(family.model_class.from_pretrained(tiny_smolvlm).eval())
    prompt = collator(generation_rows())
    check_first_token_is_learnt_where_generate_predicts_it(model, layout, collator(training_rows()), prompt)


def test_the_image_cache_gives_the_pixel_values_of_the_real_size_photos(tiny_smolvlm, photo_folder, tmp_path):
    """Preprocessed once (one uint8 array per image, though SmolVLM's processor returns a row of images), the
    collator's pixel values equal those of the original photos, image splitting off as the layout sets it."""
    processor, _, _, collator = setup(tiny_smolvlm)
    paths = sorted(str(path) for path in photo_folder.glob("photo_*"))[:5]
    split = datasets.Dataset.from_dict({"image": paths, "references": [["a"]] * 5, "image_id": paths})
    cache = build_image_cache(split, processor.image_processor, root=tmp_path, num_workers=0, show_progress=False)
    assert len(cache) == 5 and cache[0].dim() == 3
    rows = [{"image": load_image(path), "image_index": i} for i, path in enumerate(paths)]
    cached_rows = [{"image": cache[i], "image_index": i} for i in range(5)]
    assert torch.equal(collator(cached_rows)["pixel_values"], collator(rows)["pixel_values"])
    assert collator(rows)["pixel_values"].shape[:2] == (5, 1)  # one image per row


def test_batched_beam_search_captions_each_image_as_alone(tiny_smolvlm):
    """One image per row of pixel_values: beam search expands the images with their rows."""
    _, family, _, collator = setup(tiny_smolvlm)
    model = family.model_class.from_pretrained(tiny_smolvlm).eval()
    settings = dict(num_beams=3, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
        batched = model.generate(**generation_inputs(collator(generation_rows())), **settings)
        alone = [
            model.generate(**generation_inputs(collator(generation_rows([image]))), **settings) for image in IMAGES
        ]
    assert batched[0].tolist() != batched[1].tolist()  # the two images get different captions
    for row, single in enumerate(alone):
        assert batched[row].tolist() == single[0].tolist()


# --- image splitting -----------------------------------------------------------------------------------------------


def test_with_image_splitting_each_training_row_is_the_processors_conversation_for_its_image(tiny_smolvlm):
    processor, layout, collator = split_setup(tiny_smolvlm)
    batch = collator(training_rows(SPLIT_IMAGES, SPLIT_CAPTIONS))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    length = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (3, 5, 3, 32, 32)  # up to 2 x 2 tiles and the global image per row
    for row, (image, caption, (rows, cols)) in enumerate(zip(SPLIT_IMAGES, SPLIT_CAPTIONS, SPLIT_GRIDS, strict=True)):
        encoded = processor.apply_chat_template(
            conversation(DEFAULT_PROMPT, image, caption), tokenize=True, return_dict=True
        )
        expected = [int(i) for i in encoded["input_ids"][0]]
        prompt_ids = chat_ids(processor, image, DEFAULT_PROMPT)
        assert expected[: len(prompt_ids)] == prompt_ids == layout.generation_row((rows, cols))["input_ids"]
        assert prompt_ids.count(layout.image_token_id) == NUM_IMAGE_TOKENS * (rows * cols + 1)
        pad = length - len(expected)
        assert batch["input_ids"][row].tolist() == expected + [tok.pad_token_id] * pad
        answer = tok(caption, add_special_tokens=False).input_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer + [eou] + [IGNORE_INDEX] * (1 + pad)
        assert batch["labels"][row].tolist() == labels
        # The processor's tiles, then its global image; rows with fewer are padded with all-zero images.
        pixels = encoded["pixel_values"][0]
        assert len(pixels) == rows * cols + 1
        torch.testing.assert_close(batch["pixel_values"][row, : len(pixels)], pixels, atol=0, rtol=0)
        assert not batch["pixel_values"][row, len(pixels) :].any()


def test_with_image_splitting_generation_prompts_are_left_padded_and_captions_start_at_their_width(tiny_smolvlm):
    processor, layout, collator = split_setup(tiny_smolvlm)
    batch = collator(generation_rows(SPLIT_IMAGES))
    tok = processor.tokenizer
    width = batch["input_ids"].shape[1]
    prompts = [chat_ids(processor, image, DEFAULT_PROMPT) for image in SPLIT_IMAGES]
    # 2 x 2 tiles give the longest prompt; 2 x 1 one more "\n" (a row of tiles) than 1 x 2
    assert width == len(prompts[2]) > len(prompts[1]) == len(prompts[0]) + 1
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        assert batch["input_ids"][row].tolist() == [tok.pad_token_id] * pad + prompt
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    answer = tok("a red dog", add_special_tokens=False).input_ids
    generated = torch.cat([batch["input_ids"], torch.tensor([[*answer, eou]] * 3)], dim=1)
    tokens = layout.caption_tokens(generated, batch["input_ids"])
    assert layout.decode_captions(tokens, tok) == ["a red dog"] * 3


def test_with_image_splitting_the_loss_is_next_token_cross_entropy_and_padding_images_change_nothing(tiny_smolvlm):
    """Each row alone has no padding image: equal per-row losses show that get_image_features drops them."""
    _, _, collator = split_setup(tiny_smolvlm)
    model = SMOLVLM.model_class.from_pretrained(tiny_smolvlm).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows(SPLIT_IMAGES, SPLIT_CAPTIONS))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_with_image_splitting_batched_generation_captions_each_image_as_alone(tiny_smolvlm, num_beams):
    """Prompts of different lengths (left-padded) and rows of different numbers of tiles (zero-padded)."""
    _, layout, collator = split_setup(tiny_smolvlm)
    model = sharpen(SMOLVLM.model_class.from_pretrained(tiny_smolvlm).eval())
    settings = dict(num_beams=num_beams, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batch = collator(generation_rows(SPLIT_IMAGES))
        batched = layout.caption_tokens(model.generate(**generation_inputs(batch), **settings), batch["input_ids"])
        for row, image in enumerate(SPLIT_IMAGES):
            alone = collator(generation_rows([image]))
            single = layout.caption_tokens(model.generate(**generation_inputs(alone), **settings), alone["input_ids"])
            assert batched[row].tolist() == single[0].tolist()
    assert len({tuple(row) for row in batched.tolist()}) > 1  # the images get different captions


def test_with_image_splitting_grouped_batches_give_the_loss_and_gradients_of_ungrouped_ones(tiny_smolvlm):
    """Images of different tile counts, each once in a grouped batch: its features are shared by its captions."""
    processor, layout, _ = split_setup(tiny_smolvlm)
    config = AutoConfig.from_pretrained(tiny_smolvlm)
    torch.manual_seed(0)
    arguments = ModelArguments(model_name_or_path=str(tiny_smolvlm))
    model = load_model(arguments, LoraArguments(lora_dropout=0.0), config, SMOLVLM)
    model.eval()
    for name, parameter in model.named_parameters():  # LoRA B starts at zero; make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    order = [0, 1, 0, 2, 1]
    rows = [
        {"image": SPLIT_IMAGES[image], "caption": CAPTIONS[row % 2], "image_index": image}
        for row, image in enumerate(order)
    ]
    plain = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(rows)
    grouped = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)(rows)
    assert plain["pixel_values"].shape[:2] == (5, 5) and grouped["pixel_values"].shape[:2] == (3, 5)
    assert torch.equal(grouped["input_ids"], plain["input_ids"])

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
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(plain)
    grouped_loss, grouped_grads = loss_and_grads(grouped)
    torch.testing.assert_close(grouped_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == grouped_grads.keys() and all(grad.abs().sum() > 0 for grad in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(grouped_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_image_cut_into_more_tiles_than_the_layout_knows_is_a_clear_error(tiny_smolvlm):
    _, layout, _ = split_setup(tiny_smolvlm)
    with pytest.raises(ValueError, match=r"3 x 3 grid of tiles.*build the layout after changing them"):
        layout.training_row([5], (3, 3))


@pytest.fixture(scope="module")
def tiny_smolvlm_64(tiny_smolvlm, tmp_path_factory) -> Path:
    """The tiny checkpoint with its processor resizing images to SPLIT_EDGE (not yet splitting: the flag does)."""
    path = tmp_path_factory.mktemp("tiny-smolvlm-64")
    shutil.copytree(tiny_smolvlm, path, dirs_exist_ok=True)
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor.size = {"longest_edge": SPLIT_EDGE}
    processor.save_pretrained(path)
    return path


@pytest.mark.slow
def test_an_image_splitting_run_captions_at_inference_as_in_training(tiny_smolvlm_64, tmp_path, capsys):
    """--image_splitting: no preprocessing cache; the saved processor splits, so caption_images.py and the card's
    snippet give the run's predictions (images of three aspect ratios, batches mixing their grids)."""
    data = tmp_path / "data"
    data.mkdir()
    sizes = [(60, 20), (20, 60), (40, 40)]
    rows = []
    for i in range(12):
        noise(sizes[i % 3], i).save(data / f"img_{i:02d}.png")
        rows.append({"file_name": f"img_{i:02d}.png", "caption": [SPLIT_CAPTIONS[i % 3]]})
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    argv = tiny_run_argv(
        tiny_smolvlm_64, data, output, image_splitting=True, learning_rate=1e-2, per_device_eval_batch_size=3
    )
    results = main(argv)
    assert "no preprocessing cache" in capsys.readouterr().out
    assert results["predict"]["test_samples"] == 3 and "test_cider" in results["predict"]
    saved = AutoProcessor.from_pretrained(output).image_processor
    assert saved.do_image_splitting is True and saved.size["longest_edge"] == SPLIT_EDGE
    assert [grid for grid, _ in load_captioner(output, device="cpu").layout.grid_prompt_ids][-1] == (2, 2)

    lines = predictions(output)
    captions_file = tmp_path / "captions.jsonl"
    images = [str(data / line["image"]) for line in lines]
    caption_images.main(["--model", str(output), "--images", *images, "--output", str(captions_file)])
    rows = [json.loads(row) for row in captions_file.read_text().splitlines()]
    written = {Path(row["image"]).name: row["caption"] for row in rows}
    assert written == {line["image"]: line["prediction"] for line in lines}
    code = explicit_snippet((output / "README.md").read_text())
    for line in lines:
        caption = run_card_snippet(code, data / line["image"], MODEL_ID=output, BASE_ID=tiny_smolvlm_64)
        assert caption == line["prediction"]
