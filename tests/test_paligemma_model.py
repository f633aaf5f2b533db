"""PaliGemma / PaliGemma 2 as transformers ships it, on a tiny checkpoint built offline (captioning/tiny_paligemma.py).

These tests pin what a PaliGemma captioner family relies on: the processor's ``suffix=`` training row, the loss the
model computes from it, the bidirectional prefix, the first generated token, left-padded batched generation, and that a
tiny model can learn captions end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GemmaTokenizer,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)

from captioning.tiny_paligemma import build_tiny_paligemma
from tests.photos import write_photos

PROMPT = "caption en"
NUM_IMAGE_TOKENS = 16  # image 32 / patch 8 -> 4 x 4 patches


@pytest.fixture(scope="module", params=[True, False], ids=["paligemma2", "paligemma1"])
def checkpoint(request, tmp_path_factory):
    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma"), gemma2=request.param)


@pytest.fixture(scope="module")
def paligemma2(tmp_path_factory):
    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma2"))


def load(path):
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return processor, model


def images():
    return [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 200, 10))]


def encode(processor, **kwargs):
    """``processor(...)`` as torch tensors. Not ``return_tensors="pt"``: with a suffix the processor then calls
    ``np.array`` on torch tensors (processing_paligemma.py:130), a DeprecationWarning under torch 2.14 + numpy 2.4."""
    return processor(**kwargs, return_tensors="np").convert_to_tensors("pt")


def without_labels(inputs):
    return {key: value for key, value in inputs.items() if key != "labels"}


def test_checkpoint_loads_with_auto_classes(checkpoint):
    processor, model = load(checkpoint)
    assert isinstance(processor, PaliGemmaProcessor)
    assert isinstance(processor.tokenizer, GemmaTokenizer)
    assert isinstance(processor.image_processor, SiglipImageProcessor)
    assert isinstance(model, PaliGemmaForConditionalGeneration)
    tokenizer = processor.tokenizer
    specials = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    assert specials == [0, 1, 2, 3]
    assert processor.image_token_id == model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.convert_tokens_to_ids("<loc1023>") != tokenizer.unk_token_id
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert processor.image_seq_length == model.config.text_config.num_image_tokens == NUM_IMAGE_TOKENS
    assert tokenizer.padding_side == "left"
    # Like the Hub's tokenizer, a bare tokenizer writes <bos>; the processor turns that off and writes it itself.
    assert AutoTokenizer.from_pretrained(checkpoint)("a dog").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer("a dog").input_ids[0] != tokenizer.bos_token_id


def test_training_row_and_generation_prompt(checkpoint):
    processor, _ = load(checkpoint)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    prefix = [processor.image_token_id] * NUM_IMAGE_TOKENS + [tokenizer.bos_token_id] + ids(["caption", "▁en", "\n"])
    caption = ids(["a", "▁red", "▁dog"]) + [tokenizer.eos_token_id]  # the suffix is tokenized alone: "a", not "▁a"
    assert tokenizer.unk_token_id not in prefix + caption

    row = encode(processor, images=images()[0], text=PROMPT, suffix="a red dog")
    assert row["input_ids"][0].tolist() == prefix + caption
    assert row["token_type_ids"][0].tolist() == [0] * len(prefix) + [1] * len(caption)
    assert row["labels"][0].tolist() == [-100] * len(prefix) + caption
    assert row["attention_mask"][0].tolist() == [1] * (len(prefix) + len(caption))
    assert row["pixel_values"].shape == (1, 3, 32, 32)

    # transformers#35200 (4.47): "<image>" written in the text gave a different row; here both spellings agree.
    explicit = encode(processor, images=images()[0], text="<image>" + PROMPT, suffix="a red dog")
    for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
        assert explicit[key].tolist() == row[key].tolist()

    prompt = encode(processor, images=images()[0], text=PROMPT)
    assert prompt["input_ids"][0].tolist() == prefix
    assert prompt["token_type_ids"][0].tolist() == [0] * len(prefix)
    assert prompt["labels"][0].tolist() == [-100] * len(prefix)  # always returned, even without a suffix

    # Without text the processor tokenizes nothing: the suffix is dropped without a word.
    assert "input_ids" not in processor(images=images()[0], suffix="a red dog")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_model_loss_is_next_token_cross_entropy_with_padding(checkpoint, padding_side):
    processor, model = load(checkpoint)
    batch = encode(
        processor,
        images=images(),
        text=[PROMPT, PROMPT],
        suffix=["a red dog", "the green cat is on the grass"],
        padding="longest",
        padding_side=padding_side,
    )
    assert (batch["attention_mask"] == 0).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        output = model(**batch)
    logits, labels = output.logits.float(), batch["labels"]
    # Position t predicts token t + 1, as generate consumes the logits: one shift, done here and not again inside.
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=0)
    unshifted = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(output.loss.item() - unshifted.item()) > 1e-3

    # Padding changes nothing for the real tokens of a row.
    for i, caption in enumerate(["a red dog", "the green cat is on the grass"]):
        alone = encode(processor, images=images()[i], text=PROMPT, suffix=caption)
        with torch.no_grad():
            alone_logits = model(**alone).logits[0]
        kept = batch["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i][kept], alone_logits, atol=1e-4, rtol=0)


def caption_logits(processor, model, prompt, caption, *, token_type_ids=True):
    inputs = without_labels(encode(processor, images=images()[0], text=prompt, suffix=caption))
    if not token_type_ids:
        del inputs["token_type_ids"]
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_prefix_attends_both_ways_and_suffix_causally(checkpoint):
    processor, model = load(checkpoint)
    prefix_length = NUM_IMAGE_TOKENS + 1 + 3
    base = caption_logits(processor, model, PROMPT, "a red dog")
    # The prompt's last word changes what the image positions compute: the prefix is bidirectional ...
    other_prompt = caption_logits(processor, model, "caption a", "a red dog")
    assert (base[:NUM_IMAGE_TOKENS] - other_prompt[:NUM_IMAGE_TOKENS]).abs().max() > 1e-3
    # ... while a later caption word changes nothing before it: the suffix is causal.
    other_caption = caption_logits(processor, model, PROMPT, "a red cat")
    torch.testing.assert_close(base[: prefix_length + 2], other_caption[: prefix_length + 2], atol=0, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_without_token_type_ids_only_paligemma1_on_sdpa_sees_the_future(checkpoint, attn_implementation):
    """An upstream hazard, pinned so that a fix shows up here: PaliGemmaConfig sets the text config's
    ``use_bidirectional_attention=True`` (configuration_paligemma.py:91), so Gemma's attention has ``is_causal=False``;
    without token_type_ids and without padding, create_causal_mask lets SDPA skip the mask (None) and SDPA then
    attends both ways over the whole row, caption included. Gemma 2 has no SDPA (eager, mask always built).
    A PaliGemma family must always pass the processor's token_type_ids."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    gemma2 = AutoModelForImageTextToText.from_pretrained(checkpoint).config.text_config.model_type == "gemma2"
    if gemma2 and attn_implementation == "sdpa":
        pytest.skip("Gemma2Model does not support SDPA (softcapping)")
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation=attn_implementation).eval()
    dog = caption_logits(processor, model, PROMPT, "a red dog", token_type_ids=False)
    cat = caption_logits(processor, model, PROMPT, "a red cat", token_type_ids=False)
    leaks = (dog[:-2] - cat[:-2]).abs().max().item() > 1e-4  # "dog"/"cat" is the second-to-last token
    assert leaks is (not gemma2 and attn_implementation == "sdpa")
    # Without token_type_ids the prefix is causal where it does not leak: not the attention PaliGemma trains with.
    if not leaks:
        prefix_length = NUM_IMAGE_TOKENS + 1 + 3
        with_types = caption_logits(processor, model, PROMPT, "a red dog")
        assert (dog[:prefix_length] - with_types[:prefix_length]).abs().max() > 1e-3


def test_first_generated_token_is_the_teacher_forced_prediction_of_the_last_prefix_position(paligemma2):
    processor, model = load(paligemma2)
    with torch.no_grad():  # a sharper random model, so argmax is not a coin toss between near-equal logits
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    image = images()[0]
    row = encode(processor, images=image, text=PROMPT, suffix="a red dog")
    prompt = encode(processor, images=image, text=PROMPT)
    prefix_length = prompt["input_ids"].shape[1]
    with torch.no_grad():
        teacher_forced = model(**row).logits[0]
        generated = model.generate(
            **without_labels(prompt),
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert row["input_ids"][0, prefix_length - 1] == processor.tokenizer.convert_tokens_to_ids("\n")
    assert row["labels"][0, prefix_length] != -100  # the first caption token is the target of position "\n"
    assert generated.sequences[0, :prefix_length].tolist() == prompt["input_ids"][0].tolist()
    assert generated.sequences[0, prefix_length].item() == teacher_forced[prefix_length - 1].argmax().item()
    torch.testing.assert_close(generated.logits[0][0], teacher_forced[prefix_length - 1], atol=1e-4, rtol=0)


def test_batched_generation_needs_left_padding(paligemma2):
    processor, model = load(paligemma2)
    prompts = [PROMPT, "caption en en en"]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)

    def generate(inputs):
        with torch.no_grad():
            return model.generate(**without_labels(inputs), **kwargs)

    pairs = zip(images(), prompts, strict=True)
    singles = [generate(encode(processor, images=[image], text=[text])) for image, text in pairs]
    for side, matches in (("left", True), ("right", False)):
        batch = encode(processor, images=images(), text=prompts, padding="longest", padding_side=side)
        batched = generate(batch)
        close = all(
            torch.allclose(batched.logits[step][i], singles[i].logits[step][0], atol=1e-4)
            for i in range(2)
            for step in range(4)
        )
        assert close is matches, side


def test_tiny_paligemma_learns_captions_of_real_size_photos(paligemma2, tmp_path):
    torch.manual_seed(0)
    processor, model = load(paligemma2)
    photos = write_photos(tmp_path, 4, png_every=0, rotate_every=0)
    pictures = [Image.open(tmp_path / photo.file_name).convert("RGB") for photo in photos]
    captions = [photo.captions[0] for photo in photos]  # "a red dog", "a green dog", ...: only the colour differs
    batch = encode(processor, images=pictures, text=[PROMPT] * 4, suffix=captions, padding="longest")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()

    prompts = encode(processor, images=pictures, text=[PROMPT] * 4, padding="longest")
    with torch.no_grad():
        generated = model.generate(**without_labels(prompts), max_new_tokens=8, do_sample=False)
    new_tokens = generated[:, prompts["input_ids"].shape[1] :]
    assert processor.batch_decode(new_tokens, skip_special_tokens=True) == captions, f"loss {loss.item():.4f}"
