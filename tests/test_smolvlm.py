"""SmolVLM2 as a family (captioning/families/smolvlm.py): the collator's rows are the processor's own chat-template
conversations (the caption as the assistant's answer), the loss is next-token cross-entropy over the caption and
its <end_of_utterance>, generation starts where training does, image grouping shares features (tests/test_grouping.py)
and main() trains a LoRA adapter, evaluates, captions and writes the card."""

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

from captioning.arguments import LoraArguments
from captioning.families import SMOLVLM, detect_family
from captioning.families.smolvlm import DEFAULT_PROMPT, conversation
from captioning.image_cache import build_image_cache
from captioning.images import load_image
from captioning.layout import IGNORE_INDEX
from captioning.modeling import resolve_lora_targets
from captioning.trainer import generation_inputs
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.conftest import tiny_run_argv
from tests.decoder_checks import (
    check_first_token_is_learnt_where_generate_predicts_it,
    check_loss_is_next_token_cross_entropy,
    sharpen,
)

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


def test_image_splitting_is_turned_off(tiny_smolvlm):
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    processor.image_processor.do_image_splitting = True  # as the Hub checkpoints ship
    build_layout(SMOLVLM, AutoConfig.from_pretrained(tiny_smolvlm), processor)
    assert processor.image_processor.do_image_splitting is False
    pixels = processor.image_processor(images=[[image] for image in IMAGES], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 1, 3, 32, 32)  # one global image per picture


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


# --- end to end: main() ---------------------------------------------------------------------------------------------


def card_snippet(card: str) -> str:
    return re.search(r"## How to use.*?```python\n(.*?)```", card, flags=re.S).group(1)


def run_card_snippet(code: str, image_path: Path) -> str:
    code = re.sub(r"^image_path = .*$", f"image_path = {json.dumps(str(image_path))}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace["caption"]


def predictions_of(output: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    return {line["image"]: line["prediction"] for line in lines}


@pytest.mark.slow
def test_lora_run_trains_evaluates_predicts_and_writes_a_card(tiny_smolvlm, caption_folder, tmp_path):
    output = tmp_path / "out"
    argv = tiny_run_argv(
        tiny_smolvlm,
        caption_folder,
        output,
        eval_baseline=True,
        learning_rate=1e-2,
        max_new_tokens=6,
    )
    results = main(argv)
    for phase, prefix in (("baseline", "eval"), ("eval", "eval"), ("predict", "test")):
        for key in ("bleu_4", "rouge_l", "cider", "loss"):
            assert f"{prefix}_{key}" in results[phase], (phase, key)
    assert results["train"]["train_loss"] > 0
    assert results["eval"]["eval_loss"] < results["baseline"]["eval_loss"]
    settings = json.loads((output / "captioning_config.json").read_text())
    assert settings["family"] == "smolvlm" and settings["caption_prompt"] == DEFAULT_PROMPT
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["target_modules"] and all("text_model" in name for name in adapter["target_modules"])
    predictions = predictions_of(output)
    assert len(predictions) == 3 and all(isinstance(caption, str) for caption in predictions.values())
    card = (output / "README.md").read_text()
    assert "smolvlm" in ModelCard(card).data.tags and "SmolVLM" in card
    code = card_snippet(card)
    for image, prediction in list(predictions.items())[:2]:
        assert run_card_snippet(code, caption_folder / image) == prediction


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
