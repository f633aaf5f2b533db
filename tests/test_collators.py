"""Exact batches for each family: BOS, prompt masking, padding out of the loss, generation batches without captions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.families import BLIP, BLIP2_OPT, BLIP2_T5, detect_family
from collators import IGNORE_INDEX, CaptionCollator, build_layout


def _setup(path, prompt="", max_caption_length=64):
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    layout = build_layout(family, config, processor.tokenizer, prompt)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout, max_caption_length)
    return processor, config, family, layout, collator


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


IMAGES = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (24, 48), (10, 10, 200))]
ROWS = [{"image": IMAGES[0], "caption": "a red dog"}, {"image": IMAGES[1], "caption": "two blue cats on the grass"}]


def test_family_detection(tiny_models):
    assert detect_family(AutoConfig.from_pretrained(tiny_models["blip"])) is BLIP
    assert detect_family(AutoConfig.from_pretrained(tiny_models["blip2-opt"])) is BLIP2_OPT
    assert detect_family(AutoConfig.from_pretrained(tiny_models["blip2-t5"])) is BLIP2_T5


def test_blip_training_batch_is_exact(tiny_blip):
    processor, config, _, _, collator = _setup(tiny_blip)
    tok = processor.tokenizer
    dec, sep, pad = config.text_config.bos_token_id, config.text_config.sep_token_id, config.text_config.pad_token_id
    assert dec == tok.convert_tokens_to_ids("[DEC]") and dec != tok.cls_token_id
    short, long = _ids(tok, "a red dog"), _ids(tok, "two blue cats on the grass")
    batch = collator(ROWS)

    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    length = 1 + len(long) + 1
    expected_ids = torch.tensor(
        [
            [dec, *short, sep] + [pad] * (length - len(short) - 2),
            [dec, *long, sep],
        ]
    )
    expected_mask = (torch.arange(length)[None, :] < torch.tensor([[len(short) + 2], [length]])).long()
    expected_labels = torch.tensor(
        [
            [IGNORE_INDEX, *short, sep] + [IGNORE_INDEX] * (length - len(short) - 2),
            [IGNORE_INDEX, *long, sep],
        ]
    )
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert torch.equal(batch["labels"], expected_labels)
    expected_pixels = processor.image_processor(images=IMAGES, return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected_pixels)


def test_blip_prompt_is_masked_and_generation_batch_has_no_caption(tiny_blip):
    processor, config, _, layout, collator = _setup(tiny_blip, prompt="a picture of ")
    tok = processor.tokenizer
    dec, sep = config.text_config.bos_token_id, config.text_config.sep_token_id
    prompt = _ids(tok, "a picture of")
    caption = _ids(tok, "a red dog")
    batch = collator(ROWS[:1])
    assert batch["input_ids"].tolist() == [[dec, *prompt, *caption, sep]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * (1 + len(prompt)) + caption + [sep]]

    generation = collator([{"image": IMAGES[0], "image_index": 7}, {"image": IMAGES[1], "image_index": 3}])
    assert set(generation) == {"pixel_values", "input_ids", "attention_mask", "image_index"}
    assert generation["input_ids"].tolist() == [[dec, *prompt, sep]] * 2
    assert generation["attention_mask"].tolist() == [[1] * (len(prompt) + 2)] * 2
    assert generation["image_index"].tolist() == [7, 3]
    # generate() echoes [DEC] + prompt; decoding removes exactly that.
    generated = torch.tensor([[dec, *prompt, *caption, sep, 0, 0]])
    assert layout.decode(generated, tok) == ["a red dog"]


def test_max_caption_length_truncates_caption_tokens_only(tiny_blip):
    processor, config, _, _, collator = _setup(tiny_blip, prompt="a picture of ", max_caption_length=2)
    tok = processor.tokenizer
    dec, sep = config.text_config.bos_token_id, config.text_config.sep_token_id
    batch = collator(ROWS[1:])
    assert batch["input_ids"].tolist() == [[dec, *_ids(tok, "a picture of"), *_ids(tok, "two blue"), sep]]


def test_blip2_opt_batches_are_exact(tiny_blip2_opt):
    processor, config, _, layout, collator = _setup(tiny_blip2_opt, prompt="a photo of ")
    tok = processor.tokenizer
    image, bos, eos, pad = (
        config.image_token_id,
        config.text_config.bos_token_id,
        config.text_config.eos_token_id,
        config.text_config.pad_token_id,
    )
    queries = [image] * config.num_query_tokens
    prompt = _ids(tok, "a photo of")  # trailing space moves onto the caption for byte-level BPE
    short, long = _ids(tok, " a red dog"), _ids(tok, " two blue cats on the grass")
    batch = collator(ROWS)
    prefix = [*queries, bos, *prompt]
    assert batch["input_ids"].tolist() == [
        prefix + short + [eos] + [pad] * (len(long) - len(short)),
        prefix + long + [eos],
    ]
    masked = [IGNORE_INDEX] * len(prefix)
    assert batch["labels"].tolist() == [
        masked + short + [eos] + [IGNORE_INDEX] * (len(long) - len(short)),
        masked + long + [eos],
    ]
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(prefix) + len(short) + 1, len(prefix) + len(long) + 1]

    generation = collator([{"image": IMAGES[0], "image_index": 0}])
    assert generation["input_ids"].tolist() == [prefix]
    generated = torch.tensor([[*prefix, *short, eos, -100]])
    assert layout.decode(generated, tok) == ["a red dog"]


def test_blip2_t5_batches_are_exact(tiny_blip2_t5):
    processor, config, _, layout, collator = _setup(tiny_blip2_t5, prompt="a photo of ")
    tok = processor.tokenizer
    image, eos = config.image_token_id, config.text_config.eos_token_id
    encoder = [image] * config.num_query_tokens + _ids(tok, "a photo of") + [eos]
    short, long = _ids(tok, "a red dog"), _ids(tok, "two blue cats on the grass")
    batch = collator(ROWS)
    assert batch["input_ids"].tolist() == [encoder, encoder]
    assert batch["attention_mask"].tolist() == [[1] * len(encoder)] * 2
    assert batch["labels"].tolist() == [
        short + [eos] + [IGNORE_INDEX] * (len(long) - len(short)),
        long + [eos],
    ]
    generation = collator([{"image": IMAGES[0], "image_index": 0}])
    assert generation["input_ids"].tolist() == [encoder]
    decoder_start = config.text_config.decoder_start_token_id
    assert layout.decode(torch.tensor([[decoder_start, *short, eos]]), tok) == ["a red dog"]


@pytest.mark.parametrize("family", ["blip", "blip2-opt", "blip2-t5"])
def test_loss_ignores_padding_and_prompt(tiny_models, family):
    """The model's loss equals cross-entropy over caption tokens only: padding and prompt never count."""
    processor, config, fam, _, collator = _setup(tiny_models[family], prompt="a photo of ")
    model = fam.model_class.from_pretrained(tiny_models[family]).eval()
    batch = collator(ROWS)
    with torch.no_grad():
        output = model(**batch)
    labels = batch["labels"]
    logits = output.logits
    if fam.name != "blip2-t5":  # one sequence: position t predicts token t + 1 (T5 decodes its own targets)
        logits, labels = logits[:, :-1], labels[:, 1:]
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(output.loss, manual)
    # The same rows one by one, without padding, give the same per-token losses.
    token_losses = []
    for row in ROWS:
        single = collator([row])
        with torch.no_grad():
            out = model(**single)
        token_losses.append((out.loss, (single["labels"] != IGNORE_INDEX).sum()))
    weighted = sum(loss * count for loss, count in token_losses) / sum(count for _, count in token_losses)
    torch.testing.assert_close(output.loss, weighted, rtol=1e-4, atol=1e-5)


def test_blip_training_starts_with_the_token_generate_starts_with(tiny_blip):
    processor, config, fam, _, collator = _setup(tiny_blip)
    model = fam.model_class.from_pretrained(tiny_blip).eval()
    generation = collator([{"image": IMAGES[0], "image_index": 0}])
    generated = model.generate(
        pixel_values=generation["pixel_values"],
        input_ids=generation["input_ids"],
        attention_mask=generation["attention_mask"],
        max_new_tokens=3,
    )
    training = collator(ROWS[:1])
    assert generated[0, 0].item() == training["input_ids"][0, 0].item() == config.text_config.bos_token_id


def test_blip2_opt_training_continues_exactly_the_prompt_generate_starts_from(tiny_blip2_opt):
    """Decoder-only: generate continues [image tokens, BOS, prompt]; the training row starts with the same ids, so
    the first caption token is learnt from the position generate predicts it from."""
    processor, config, fam, layout, collator = _setup(tiny_blip2_opt, prompt="a photo of ")
    model = fam.model_class.from_pretrained(tiny_blip2_opt).eval()
    generation = collator([{"image": IMAGES[0], "image_index": 0}])
    generated = model.generate(**{k: v for k, v in generation.items() if k != "image_index"}, max_new_tokens=2)
    prompt = generation["input_ids"][0].tolist()
    training = collator(ROWS[:1])["input_ids"][0].tolist()
    assert training[: len(prompt)] == prompt == generated[0, : len(prompt)].tolist()
    assert layout.generated_prefix_length == len(prompt)


def test_blip2_t5_decoder_starts_training_with_the_token_generate_starts_with(tiny_blip2_t5):
    """Encoder-decoder: T5 shifts the labels right behind decoder_start_token_id; generate starts there too."""
    processor, config, fam, _, collator = _setup(tiny_blip2_t5)
    model = fam.model_class.from_pretrained(tiny_blip2_t5).eval()
    generation = collator([{"image": IMAGES[0], "image_index": 0}])
    generated = model.generate(**{k: v for k, v in generation.items() if k != "image_index"}, max_new_tokens=2)
    labels = collator(ROWS[:1])["labels"]
    decoder_inputs = model.language_model._shift_right(labels)
    start = config.text_config.decoder_start_token_id
    assert decoder_inputs[0, 0].item() == generated[0, 0].item() == start
    assert decoder_inputs[0, 1:].tolist() == labels[0, :-1].tolist()  # then the caption, one position late
