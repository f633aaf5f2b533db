"""Florence-2 as a family of this tool: the collator's batches equal the processor's own encoding, the loss is plain
cross-entropy over ``<s> caption </s>``, training and generation start the decoder alike, grouped == ungrouped,
LoRA reaches the language model only, and remote-code checkpoints are refused before loading.

End-to-end runs of ``main()`` (LoRA + push, 4-bit LoRA, full fine-tuning with the vision tower frozen, overfitting)
are in tests/test_florence2_runs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Florence2ForConditionalGeneration
from transformers.models.florence2.modeling_florence2 import shift_tokens_right

from captioning.arguments import LoraArguments, ModelArguments, parse_args, validate_args
from captioning.families import BLIP, BLIP2_OPT, BLIP2_T5, FAMILIES, FLORENCE2, detect_family
from captioning.layout import IGNORE_INDEX
from captioning.modeling import load_config, resolve_lora_targets
from captioning.tiny_florence2 import CAPTION_TASKS
from collators import CaptionCollator, build_layout

BOS, PAD, EOS = 0, 1, 2
IMAGE = 504  # the tiny tokenizer's <image>
Q = 17  # image tokens of the tiny checkpoint (32x32 images): 1 + (32 / 8)^2
CAPTION_SENTENCE = [0, 305, 444, 493, 448, 438, 34, 2]  # <s> What does the image describe? </s>
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CAPTIONS = ["a red dog", "the blue ball is on the grass", "a man on the beach"]


@pytest.fixture(scope="module")
def processor(tiny_florence2):
    return AutoProcessor.from_pretrained(tiny_florence2)


@pytest.fixture(scope="module")
def config(tiny_florence2):
    return AutoConfig.from_pretrained(tiny_florence2)


@pytest.fixture(scope="module")
def model(tiny_florence2):
    return Florence2ForConditionalGeneration.from_pretrained(tiny_florence2).eval()


def _images(count: int = 3) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
    sizes = [(500, 375), (375, 500), (640, 480)]
    return [Image.new("RGB", sizes[i], colours[i]) for i in range(count)]


def _collator(processor, layout, **kwargs) -> CaptionCollator:
    return CaptionCollator(processor.image_processor, processor.tokenizer, layout, **kwargs)


def _training_rows(count: int = 3) -> list[dict]:
    return [
        {"image": image, "caption": caption, "image_index": i}
        for i, (image, caption) in enumerate(zip(_images(count), CAPTIONS, strict=False))
    ]


# --------------------------------------------------------------------------------------------------------------
# The family table
# --------------------------------------------------------------------------------------------------------------


def test_detected_and_registered(config):
    assert FLORENCE2 in FAMILIES
    assert detect_family(config) is FLORENCE2
    assert FLORENCE2.default_prompt == "<CAPTION>" and FLORENCE2.prompt(None) == "<CAPTION>"
    assert FLORENCE2.prompt("<DETAILED_CAPTION>") == "<DETAILED_CAPTION>"
    assert BLIP.prompt(None) == BLIP2_OPT.prompt(None) == BLIP2_T5.prompt(None) == ""  # none, as before


def test_default_lora_targets_are_the_language_models_attention_and_mlp(tiny_florence2, config):
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2)
    targets = resolve_lora_targets(model, FLORENCE2, LoraArguments())
    prefix = "model.language_model."
    expected = [
        *(f"{prefix}encoder.layers.0.self_attn.{p}" for p in ("k_proj", "v_proj", "q_proj", "out_proj")),
        f"{prefix}encoder.layers.0.fc1",
        f"{prefix}encoder.layers.0.fc2",
        *(f"{prefix}decoder.layers.0.{a}.{p}" for a in ("self_attn", "encoder_attn") for p in ("k_proj", "v_proj")),
    ]
    assert set(expected) <= set(targets) and len(targets) == 16  # 6 encoder + 10 decoder (cross-attention too)
    assert all(name.startswith(prefix) for name in targets)  # DaViT's ffn.fc1/fc2 stay out

    with_vision = resolve_lora_targets(model, FLORENCE2, LoraArguments(lora_vision=True))
    vision = [name for name in with_vision if name not in targets]
    assert len(vision) == 8 and all(name.startswith("model.vision_tower.") for name in vision)
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in vision} == {
        "window_attn.qkv",
        "window_attn.proj",
        "channel_attn.qkv",
        "channel_attn.proj",
    }


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------


def test_training_batch_is_exact(processor, config):
    layout = build_layout(FLORENCE2, config, processor)  # the family's default prompt: <CAPTION>
    assert not layout.predicts_next_token and layout.generated_prefix_length == 1  # the decoder start </s>
    rows = _training_rows(2)
    batch = _collator(processor, layout)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}

    encoder = [IMAGE] * Q + CAPTION_SENTENCE
    assert batch["input_ids"].tolist() == [encoder, encoder]
    assert batch["attention_mask"].tolist() == [[1] * len(encoder)] * 2
    # <s> caption </s>, padded with -100 ("a red dog" = 68 442 359)
    assert batch["labels"].tolist()[0] == [BOS, 68, 442, 359, EOS] + [IGNORE_INDEX] * 4
    assert batch["labels"].tolist()[1][0] == BOS and batch["labels"].tolist()[1][-1] == EOS

    # ... equal to the processor's own encoding of the task token, and the tokenizer's own encoding of the captions
    expected = processor(images=[row["image"] for row in rows], text=["<CAPTION>"] * 2, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    captions = processor.tokenizer([row["caption"] for row in rows], padding=True, return_tensors="pt")
    assert torch.equal(batch["labels"], captions["input_ids"].masked_fill(captions["attention_mask"] == 0, -100))


@pytest.mark.parametrize("task", list(CAPTION_TASKS))
def test_generation_batch_equals_the_processors_encoding(processor, config, task):
    layout = build_layout(FLORENCE2, config, processor, task)
    images = _images(3)
    batch = _collator(processor, layout)([{"image": image, "image_index": i} for i, image in enumerate(images)])
    expected = processor(images=images, text=[task] * 3, return_tensors="pt")
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_index"}
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert batch["image_index"].tolist() == [0, 1, 2]
    sentence = processor.tokenizer(CAPTION_TASKS[task], add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == [IMAGE] * Q + [BOS, *sentence, EOS]
    # training rows feed the encoder the same ids
    training = _collator(processor, layout)(_training_rows(1))
    assert training["input_ids"][0].tolist() == batch["input_ids"][0].tolist()


def test_prompt_errors(processor, config):
    with pytest.raises(ValueError, match="--caption_prompt '<CAPTION> of a dog'"):
        build_layout(FLORENCE2, config, processor, "<CAPTION> of a dog")
    with pytest.raises(TypeError, match="from its processor"):
        FLORENCE2.build_layout(config, processor.tokenizer, "<CAPTION>")


# --------------------------------------------------------------------------------------------------------------
# Loss, first token, decoding
# --------------------------------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_over_the_labels(processor, config, model):
    """No double shift (transformers#46897): logits[:, t] is scored against labels[:, t], padding left out."""
    layout = build_layout(FLORENCE2, config, processor)
    batch = _collator(processor, layout)(_training_rows(3))
    assert (batch["labels"] == IGNORE_INDEX).any()
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits.float()
    assert logits.shape[:2] == batch["labels"].shape
    by_hand = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(output.loss, by_hand, rtol=0, atol=1e-5)


def test_first_decoder_input_is_generates_first_token(processor, config, model):
    layout = build_layout(FLORENCE2, config, processor)
    rows = _training_rows(2)
    labels = _collator(processor, layout)(rows)["labels"]
    text = config.text_config
    decoder_input_ids = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
    assert decoder_input_ids[:, :2].tolist() == [[EOS, BOS], [EOS, BOS]]  # </s> <s> caption
    generation = _collator(processor, layout)([{"image": row["image"], "image_index": 0} for row in rows])
    generation.pop("image_index")
    with torch.no_grad():  # one step; forced_eos (BART's default) would force </s> at the last allowed step
        generated = model.generate(**generation, max_new_tokens=1, do_sample=False, forced_eos_token_id=None)
    assert generated[:, 0].tolist() == decoder_input_ids[:, 0].tolist() == [EOS, EOS]


def test_decoding_equals_the_processors_post_processing(processor, config, model):
    layout = build_layout(FLORENCE2, config, processor)
    images = _images(3)
    batch = _collator(processor, layout)([{"image": image, "image_index": i} for i, image in enumerate(images)])
    batch.pop("image_index")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, num_beams=3, min_new_tokens=0)
    # and a hand-made batch: </s> <s> caption </s>, padded with <pad> or with -100 as gathered predictions are
    words = processor.tokenizer(CAPTIONS[:2], add_special_tokens=False)["input_ids"]
    width = max(len(w) for w in words) + 4
    hand = torch.full((2, width), PAD)
    for row, ids in enumerate(words):
        hand[row, : len(ids) + 3] = torch.tensor([EOS, BOS, *ids, EOS])
    hand[1, -1] = IGNORE_INDEX
    for sequences, sizes in ((generated, [image.size for image in images]), (hand, [(50, 40)] * 2)):
        texts = processor.batch_decode(sequences.clamp(min=0).masked_fill(sequences < 0, PAD), skip_special_tokens=True)
        expected = [
            processor.post_process_generation(text, task="<CAPTION>", image_size=size)["<CAPTION>"]
            for text, size in zip(texts, sizes, strict=True)
        ]
        assert layout.decode(sequences, processor.tokenizer) == expected
    assert layout.decode(hand, processor.tokenizer) == CAPTIONS[:2]


# --------------------------------------------------------------------------------------------------------------
# Remote-code checkpoints
# --------------------------------------------------------------------------------------------------------------

# The shape of microsoft/Florence-2-large's config.json (remote-code release; abridged).
REMOTE_CODE_CONFIG = {
    "architectures": ["Florence2ForConditionalGeneration"],
    "auto_map": {
        "AutoConfig": "configuration_florence2.Florence2Config",
        "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
    },
    "model_type": "florence2",
    "projection_dim": 1024,
    "text_config": {"model_type": "florence2_language", "vocab_size": 51289, "d_model": 1024},
    "vision_config": {"model_type": "davit", "dim_embed": [256, 512, 1024, 2048]},
    "vocab_size": 51289,
    "transformers_version": "4.41.0.dev0",
}


def test_remote_code_checkpoints_are_refused_before_loading(tmp_path, tiny_florence2):
    folder = tmp_path / "Florence-2-large"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(REMOTE_CODE_CONFIG))
    with pytest.raises(ValueError, match="remote-code release.*florence-community/Florence-2-large "):
        load_config(ModelArguments(model_name_or_path=str(folder)))
    # the same text_config alone gives it away
    variant = {**REMOTE_CODE_CONFIG, "vision_config": {"model_type": "florence_vision"}}
    variant.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(variant))
    with pytest.raises(ValueError, match="remote-code release"):
        load_config(ModelArguments(model_name_or_path=str(folder)))
    # with --trust_remote_code AutoConfig may load it; detection refuses it then
    config = AutoConfig.from_pretrained(tiny_florence2)
    config.auto_map = REMOTE_CODE_CONFIG["auto_map"]
    with pytest.raises(ValueError, match="florence-community/Florence-2-base"):
        detect_family(config)
    # the native checkpoint passes
    assert load_config(ModelArguments(model_name_or_path=str(tiny_florence2))).model_type == "florence2"


def test_shipped_configs(tmp_path):
    cpu = ["--use_cpu", "true", "--output_dir", str(tmp_path / "run")]  # bf16 is accepted on CPU with use_cpu only
    lora = parse_args(["--config", str(CONFIGS / "florence2_base_lora.yaml"), *cpu])
    full = parse_args(["--config", str(CONFIGS / "florence2_large_full.yaml"), *cpu])
    for args in (lora, full):
        validate_args(*args)
        assert args[1].caption_prompt == "<CAPTION>" and args[3].num_beams == 3
    assert lora[0].model_name_or_path == "florence-community/Florence-2-base" and lora[2].use_lora
    assert full[0].model_name_or_path == "florence-community/Florence-2-large"
    assert full[2].use_lora is False and full[2].freeze_vision_tower is True
