"""Florence-2 (native Florence2ForConditionalGeneration) as transformers ships it: what the processor writes for the
caption tasks, how the model builds its decoder inputs and its loss, and that a tiny one learns captions.

These test the raw model / processor on the tiny checkpoint from captioning.tiny_florence2, no tool code.

Layout (ids of the tiny tokenizer in brackets where they are fixed; Q = image_seq_length = 1 + (image_size/8)^2):
    encoder input_ids   <image>*Q <s> What does the image describe? </s>         (processor, text="<CAPTION>")
    labels              <s> caption </s>  [-100 padding]                          (tokenizer(caption), pads -> -100)
    decoder_input_ids   </s> <s> caption                                          (shift_tokens_right(labels))
    generate output     </s> <s> caption </s> [<pad> ...]                         (starts from decoder_start </s>)
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Florence2ForConditionalGeneration,
    Florence2Processor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.florence2.modeling_florence2 import shift_tokens_right

from captioning.tiny_florence2 import CAPTION_TASKS
from tests.photos import write_photos

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def processor(tiny_florence2):
    return AutoProcessor.from_pretrained(tiny_florence2)


@pytest.fixture(scope="module")
def model(tiny_florence2):
    return AutoModelForImageTextToText.from_pretrained(tiny_florence2).eval()


def _images():
    return [Image.new("RGB", (500, 375), (200, 30, 30)), Image.new("RGB", (375, 500), (30, 30, 200))]


def _labels(tokenizer, captions):
    batch = tokenizer(captions, padding=True, return_tensors="pt")  # <s> caption </s> <pad>...
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def test_checkpoint_loads_with_auto_classes(tiny_florence2, processor, model):
    assert isinstance(processor, Florence2Processor)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessor"
    assert type(processor.tokenizer).__name__ in {"BartTokenizer", "RobertaTokenizer"}  # BartTokenizer aliases it
    assert isinstance(model, Florence2ForConditionalGeneration)
    direct = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2)
    assert isinstance(direct, Florence2ForConditionalGeneration)
    config = json.loads((tiny_florence2 / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" not in config
    assert config["text_config"]["model_type"] == "bart"
    assert config["vision_config"]["model_type"] == "florence_vision"
    text = model.config.text_config
    ids = (text.bos_token_id, text.pad_token_id, text.eos_token_id, text.decoder_start_token_id)
    assert ids == (BOS, PAD, EOS, EOS)
    assert model.config.image_token_id == processor.image_token_id == processor.tokenizer.image_token_id


@pytest.mark.parametrize("task", list(CAPTION_TASKS))
def test_caption_task_encoding(processor, task):
    tokenizer = processor.tokenizer
    assert processor.task_prompts_without_inputs[task] == CAPTION_TASKS[task]
    encoded = processor(images=_images()[0], text=task, return_tensors="pt")
    sentence = tokenizer(CAPTION_TASKS[task], add_special_tokens=False)["input_ids"]
    num_image_tokens = processor.image_processor.image_seq_length
    expected = [processor.image_token_id] * num_image_tokens + [BOS, *sentence, EOS]
    assert encoded["input_ids"].tolist() == [expected]
    assert encoded["attention_mask"].tolist() == [[1] * len(expected)]
    assert tuple(encoded["pixel_values"].shape) == (1, 3, 32, 32)
    # the task token never reaches the tokenizer; every word of the sentence is one token of the tiny vocabulary
    assert tokenizer.decode(sentence) == CAPTION_TASKS[task]


def test_caption_encoding_exact_ids(processor):
    """The exact ids of <CAPTION> for the tiny checkpoint (32x32 images: 17 image tokens, <image> = 504). The real
    florence-community/Florence-2-base gives 577 x 51289 then [0, 2264, 473, 5, 2274, 6190, 116, 2]."""
    ids = processor(images=_images()[0], text="<CAPTION>")["input_ids"][0]
    assert ids == [504] * 17 + [0, 305, 444, 493, 448, 438, 34, 2]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[17:])
    assert tokens == ["<s>", "What", "Ġdoes", "Ġthe", "Ġimage", "Ġdescribe", "?", "</s>"]
    assert processor.tokenizer("a red dog")["input_ids"] == [0, 68, 442, 359, 2]  # labels: <s> caption </s>


def test_image_features_fill_the_placeholders(processor, model):
    encoded = processor(images=_images(), text=["<CAPTION>"] * 2, return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=encoded["pixel_values"]).pooler_output
    q = processor.image_processor.image_seq_length
    assert tuple(features.shape) == (2, q, model.config.text_config.d_model)
    assert int((encoded["input_ids"] == model.config.image_token_id).sum()) == 2 * q


def test_loss_is_plain_cross_entropy_over_labels(processor, model):
    """No double shift (transformers#46897, fixed by #46898): logits[:, t] predicts labels[:, t]."""
    encoded = processor(images=_images(), text=["<CAPTION>"] * 2, return_tensors="pt")
    labels = _labels(processor.tokenizer, ["a red dog", "the blue ball is on the grass"])
    assert (labels == -100).any()
    assert labels[:, 0].tolist() == [BOS, BOS]
    with torch.no_grad():
        output = model(**encoded, labels=labels)
    logits = output.logits.float()
    assert logits.shape[:2] == labels.shape
    by_hand = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, by_hand, atol=1e-5, rtol=0)
    shifted_twice = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(output.loss.item() - shifted_twice.item()) > 1e-3

    # The Trainer passes num_items_in_batch: the loss is then a sum over label tokens divided by it.
    n = int((labels != -100).sum())
    with torch.no_grad():
        summed = model(**encoded, labels=labels, num_items_in_batch=torch.tensor(n)).loss
    torch.testing.assert_close(summed, by_hand, atol=1e-5, rtol=0)


def test_decoder_inputs_are_labels_shifted_right_from_decoder_start(processor, model):
    encoded = processor(images=_images(), text=["<CAPTION>"] * 2, return_tensors="pt")
    labels = _labels(processor.tokenizer, ["a red dog", "the blue ball is on the grass"])
    text = model.config.text_config
    decoder_input_ids = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
    assert decoder_input_ids[:, 0].tolist() == [EOS, EOS]
    assert torch.equal(decoder_input_ids[:, 1:].masked_fill(decoder_input_ids[:, 1:] == PAD, -100), labels[:, :-1])
    with torch.no_grad():
        implicit = model(**encoded, labels=labels).logits
        explicit = model(**encoded, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(implicit, explicit)

    # generate starts from the same token. forced_eos_token_id (BartConfig's default, 2) would force </s> at the
    # last allowed step, so a 1-step generate is run without it.
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=1, do_sample=False, forced_eos_token_id=None)
    assert generated.shape[1] == 2
    assert generated[:, 0].tolist() == decoder_input_ids[:, 0].tolist() == [EOS, EOS]
    with torch.no_grad():
        forced = model.generate(**encoded, max_new_tokens=1, do_sample=False)
    assert forced[:, 1].tolist() == [EOS, EOS]


def test_precomputed_features(processor, model):
    """Image features (get_image_features) and, for a fixed prompt, the whole encoder output depend on the image
    only; both can be passed instead of pixel_values."""
    encoded = processor(images=_images(), text=["<CAPTION>"] * 2, return_tensors="pt")
    labels = _labels(processor.tokenizer, ["a red dog", "the blue ball is on the grass"])
    with torch.no_grad():
        reference = model(**encoded, labels=labels)
        features = model.get_image_features(pixel_values=encoded["pixel_values"]).pooler_output
        embeds = model.get_input_embeddings()(encoded["input_ids"])
        mask = (encoded["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        from_embeds = model(
            inputs_embeds=embeds.masked_scatter(mask, features), attention_mask=encoded["attention_mask"], labels=labels
        )
        encoder_outputs = model.get_encoder()(
            inputs_embeds=embeds.masked_scatter(mask, features), attention_mask=encoded["attention_mask"]
        )
        from_encoder = model(encoder_outputs=encoder_outputs, attention_mask=encoded["attention_mask"], labels=labels)
    torch.testing.assert_close(from_embeds.loss, reference.loss)
    torch.testing.assert_close(from_encoder.loss, reference.loss)
    torch.testing.assert_close(reference.encoder_last_hidden_state, encoder_outputs.last_hidden_state)

    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=6, do_sample=False)
        from_features = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            max_new_tokens=6,
            do_sample=False,
        )
    assert torch.equal(generated, from_features)


def test_tiny_model_learns_four_real_size_photos(tmp_path, tiny_florence2):
    """Plain AdamW on 4 real-size photos, one caption each; greedy and batched beam search then give them back, and
    post_process_generation returns the caption."""
    torch.manual_seed(0)
    photos = write_photos(tmp_path, 4, png_every=0, rotate_every=0)
    images = [Image.open(tmp_path / photo.file_name).convert("RGB") for photo in photos]
    captions = [photo.captions[i % 3] for i, photo in enumerate(photos)]
    assert len(set(captions)) == 4
    processor = AutoProcessor.from_pretrained(tiny_florence2)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2)
    encoded = processor(images=images, text=["<CAPTION>"] * 4, return_tensors="pt")
    labels = _labels(processor.tokenizer, captions)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    model.eval()

    with torch.no_grad():
        greedy = model.generate(**encoded, max_new_tokens=16, do_sample=False)
        beams = model.generate(**encoded, max_new_tokens=16, do_sample=False, num_beams=3)
    assert greedy[:, :2].tolist() == [[EOS, BOS]] * 4  # decoder start </s>, then the learnt <s>
    for generated in (greedy, beams):
        assert processor.batch_decode(generated, skip_special_tokens=True) == captions
    raw = processor.batch_decode(greedy, skip_special_tokens=False)
    assert raw[0].startswith("</s><s>")
    # post_process_generation strips <s> and </s> but not <pad>: padded rows of a batch need skip_special_tokens.
    leaked = processor.post_process_generation(raw[0], task="<CAPTION>", image_size=images[0].size)["<CAPTION>"]
    assert leaked.startswith(captions[0]) and leaked.endswith("<pad>")
    parsed = [
        processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)["<CAPTION>"]
        for text, image in zip(processor.batch_decode(greedy, skip_special_tokens=True), images, strict=True)
    ]
    assert parsed == captions
