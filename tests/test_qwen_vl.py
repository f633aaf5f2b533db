"""Qwen2.5-VL and Qwen3-VL as families (captioning/families/qwen2_5_vl.py, qwen3_vl.py, qwen_vl.py): each image keeps
its own size, so rows hold different numbers of <|image_pad|> tokens; the collator's rows are still the processor's
own chat-template conversations (the caption as the assistant's answer, mm_token_type_ids and image_grid_thw
included), generation prompts are left-padded and caption each image as alone, the loss is next-token
cross-entropy over the caption and its <|im_end|>, --min_pixels / --max_pixels set the token count, image grouping
shares features (tests/test_grouping.py) and main() trains a LoRA adapter, evaluates, captions and writes the card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoConfig, AutoProcessor

import caption_images
from captioning.arguments import DataArguments, LoraArguments, ModelArguments
from captioning.families import QWEN2_5_VL, QWEN3_VL, detect_family
from captioning.families.qwen_vl import DEFAULT_PROMPT
from captioning.families.smolvlm import conversation
from captioning.grouping import shared_image_features
from captioning.layout import IGNORE_INDEX
from captioning.modeling import image_feature_module, load_model, load_processor, resolve_lora_targets, saved_by_a_run
from captioning.outputs import CAPTIONING_CONFIG
from captioning.trainer import generation_inputs
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.card_snippets import explicit_snippet
from tests.conftest import make_caption_folder, tiny_run_argv
from tests.decoder_checks import check_loss_is_next_token_cross_entropy, sharpen

FAMILIES = {"tiny_qwen2_5_vl": QWEN2_5_VL, "tiny_qwen3_vl": QWEN3_VL}
both = pytest.mark.parametrize("fixture", list(FAMILIES))
# Two shapes: 8 and 2 visual tokens (Qwen2.5-VL, 28-pixel tokens: 112 x 56 and 28 x 56 after resizing), 6 and 2
# (Qwen3-VL, 32-pixel tokens: 96 x 64 and 32 x 64).
IMAGES = [Image.new("RGB", (100, 50), (200, 10, 10)), Image.new("RGB", (40, 60), (10, 200, 10))]
TOKENS = {"tiny_qwen2_5_vl": [8, 2], "tiny_qwen3_vl": [6, 2]}
CAPTIONS = ["a red dog", "the green cat is on the green grass"]  # different lengths, as the images' tokens


def setup(path, prompt=None, max_caption_length=64, group_images=False):
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    layout = build_layout(family, config, processor, prompt)
    collator = CaptionCollator(
        processor.image_processor, processor.tokenizer, layout, max_caption_length, group_images=group_images
    )
    return processor, family, layout, collator


def chat(processor, image, prompt, caption=None) -> dict:
    """The processor's own outputs for one conversation (the generation prompt when there is no caption)."""
    return processor.apply_chat_template(
        conversation(prompt, image, caption),
        add_generation_prompt=caption is None,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def training_rows(images=IMAGES, captions=CAPTIONS):
    return [{"image": image, "caption": caption} for image, caption in zip(images, captions, strict=True)]


def generation_rows(images=IMAGES):
    return [{"image": image, "image_index": i} for i, image in enumerate(images)]


# --- the family record ---------------------------------------------------------------------------------------------


@both
def test_detected_with_its_defaults_and_language_only_lora_targets(request, fixture):
    path = request.getfixturevalue(fixture)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    assert family is FAMILIES[fixture]
    assert family.prompt(None) == DEFAULT_PROMPT == "Describe this image in one sentence."
    assert (family.num_beams, family.max_new_tokens, family.min_new_tokens) == (1, 30, 0)
    assert family.image_flags == ("min_pixels", "max_pixels") and not family.fixed_image_size
    model = family.model_class.from_pretrained(path)
    targets = resolve_lora_targets(model, family, LoraArguments())
    # Qwen2.5-VL's vision blocks have gate_proj / up_proj / down_proj too: only the language model's are adapted.
    assert len(targets) == 7 * config.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in targets)
    with_vision = resolve_lora_targets(model, family, LoraArguments(lora_vision=True))
    vision = [name for name in with_vision if name not in targets]
    assert len(vision) == 2 * config.vision_config.depth
    assert all(re.fullmatch(r"model\.visual\.blocks\.\d\.attn\.(qkv|proj)", name) for name in vision)
    model.get_submodule(family.image_feature_module)  # exists
    assert (family.image_feature_module + ".").startswith(family.vision_prefix)  # frozen with the vision tower


def test_shipped_qlora_config_loads_with_the_family_defaults():
    from captioning.arguments import parse_args

    config = Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_vl_3b_qlora.yaml"
    model, data, lora, caption, training = parse_args(["--config", str(config), "--use_cpu", "true"])
    assert model.model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct" and lora.lora_target_modules is None
    assert lora.use_lora and lora.load_in_4bit and training.bf16
    assert QWEN2_5_VL.prompt(data.caption_prompt) == DEFAULT_PROMPT
    assert (data.min_pixels, data.max_pixels) == (None, None)  # the family's defaults: 4 to 256 visual tokens
    assert (caption.num_beams, caption.max_new_tokens, caption.min_new_tokens) == (1, 30, 0)


# --- batches -------------------------------------------------------------------------------------------------------


@both
@pytest.mark.parametrize("prompt", [None, "Describe this image."])
def test_training_batch_is_the_chat_templates_conversation_with_the_caption_as_answer(request, fixture, prompt):
    processor, _, layout, collator = setup(request.getfixturevalue(fixture), prompt)
    text = DEFAULT_PROMPT if prompt is None else prompt
    batch = collator(training_rows())
    assert set(batch) == {
        "pixel_values",
        "image_grid_thw",
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "labels",
    }
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    length = batch["input_ids"].shape[1]
    for row, (image, caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        expected = chat(processor, image, text, caption)
        prompt_ids = chat(processor, image, text)["input_ids"][0].tolist()
        ids = expected["input_ids"][0].tolist()
        assert ids[: len(prompt_ids)] == prompt_ids
        pad = length - len(ids)
        assert batch["input_ids"][row].tolist() == ids + [tok.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad
        assert batch["mm_token_type_ids"][row].tolist() == expected["mm_token_type_ids"][0].tolist() + [0] * pad
        assert (batch["input_ids"][row] == layout.image_token_id).sum() == TOKENS[fixture][row]
        # Everything before the answer and the template's newline after <|im_end|> are not learnt.
        answer = tok(caption, add_special_tokens=False).input_ids
        assert ids[len(prompt_ids) :] == [*answer, im_end, tok.convert_tokens_to_ids("\n")]
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer + [im_end] + [IGNORE_INDEX] * (1 + pad)
        assert batch["labels"][row].tolist() == labels
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: one is padded
    # The images' patches in one sequence, and each image's grid, as the processor gives them for the two images.
    encoded = processor.image_processor(images=IMAGES, return_tensors="pt")
    assert torch.equal(batch["image_grid_thw"], encoded["image_grid_thw"])
    torch.testing.assert_close(batch["pixel_values"], encoded["pixel_values"], atol=0, rtol=0)
    for row, image in enumerate(IMAGES):
        assert batch["image_grid_thw"][row].tolist() == chat(processor, image, text)["image_grid_thw"][0].tolist()


@both
def test_generation_batch_is_the_generation_prompt_left_padded(request, fixture):
    processor, _, layout, collator = setup(request.getfixturevalue(fixture))
    batch = collator(generation_rows())
    assert set(batch) == {"pixel_values", "image_grid_thw", "input_ids", "attention_mask", "mm_token_type_ids"} | {
        "image_index"
    }
    width = batch["input_ids"].shape[1]
    for row, image in enumerate(IMAGES):
        expected = chat(processor, image, DEFAULT_PROMPT)
        ids = expected["input_ids"][0].tolist()
        pad = width - len(ids)
        assert batch["input_ids"][row].tolist() == [processor.tokenizer.pad_token_id] * pad + ids
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
        assert batch["mm_token_type_ids"][row].tolist() == [0] * pad + expected["mm_token_type_ids"][0].tolist()
        assert batch["image_grid_thw"][row].tolist() == expected["image_grid_thw"][0].tolist()
    pads = width - batch["attention_mask"].sum(dim=1)
    assert pads.tolist() == [0, TOKENS[fixture][0] - TOKENS[fixture][1]]  # the smaller image's prompt is padded
    assert set(generation_inputs(batch)) == set(batch) - {"image_index"}
    # New tokens start at the batch's width, whatever each prompt's length.
    tok = processor.tokenizer
    caption = tok("a red dog", add_special_tokens=False).input_ids
    new = [[*caption, tok.convert_tokens_to_ids("<|im_end|>")], [*caption[:2], tok.pad_token_id, tok.pad_token_id]]
    generated = torch.cat([batch["input_ids"], torch.tensor(new)], dim=1)
    tokens = layout.caption_tokens(generated, batch["input_ids"])
    assert layout.decode_captions(tokens, tok) == ["a red dog", "a red"]
    with pytest.raises(TypeError, match="varies with its image"):
        layout.generated_prefix_length  # noqa: B018


@both
def test_a_truncated_caption_keeps_its_end_of_turn(request, fixture):
    processor, _, _, collator = setup(request.getfixturevalue(fixture), max_caption_length=2)
    batch = collator(training_rows())
    learnt = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert learnt == processor.tokenizer.convert_tokens_to_ids(["the", "green", "<|im_end|>"])


@both
def test_the_processor_saved_after_training_batches_keeps_long_prompts_whole(request, fixture, tmp_path):
    """Training batches cut captions to --max_caption_length without leaving that length in the tokenizer: the
    processor a run saves (which the card's snippet and inference load) keeps all of a large image's tokens."""
    processor, _, layout, collator = setup(request.getfixturevalue(fixture), max_caption_length=4)
    collator(training_rows())
    processor.save_pretrained(tmp_path)
    saved = AutoProcessor.from_pretrained(tmp_path)
    side = saved.image_processor.patch_size * saved.image_processor.merge_size
    image = Image.new("RGB", (4 * side, 4 * side), (20, 30, 200))  # 16 visual tokens, a 31-token prompt or more
    text = saved.apply_chat_template(conversation(DEFAULT_PROMPT), add_generation_prompt=True)
    ids = saved(text=text, images=[image], return_tensors="pt")["input_ids"][0]
    assert (ids == layout.image_token_id).sum() == 16 and len(ids) > 16 + 4


@both
def test_grouped_batches_hold_each_image_once_with_its_grid(request, fixture):
    """The model splits the vision tower's output per image by image_grid_thw, so grouped batches hand it each
    image's features as mm_encoder_outputs and each row its image's grid (equal loss and gradients:
    tests/test_grouping.py)."""
    processor, _, layout, collator = setup(request.getfixturevalue(fixture), group_images=True)
    assert layout.grouping_by == "encoder_outputs" and layout.row_image_keys == ("image_grid_thw",)
    rows = [{**row, "image_index": i % 2} for i, row in enumerate(training_rows(IMAGES * 2, CAPTIONS * 2))]
    batch = collator(rows)
    assert batch["image_group"].tolist() == [0, 1, 0, 1]
    assert torch.equal(batch["image_grid_thw"], processor.image_processor(images=IMAGES)["image_grid_thw"])
    counts = (batch["input_ids"] == layout.image_token_id).sum(dim=1).tolist()
    assert counts == TOKENS[fixture] * 2  # each row has its own image's tokens


@both
def test_grouped_loss_and_gradients_equal_ungrouped_for_images_of_different_sizes(request, fixture):
    """tests/test_grouping.py's check with images of different token counts: each caption row gets its own image's
    features (computed once per image) and grid, so the loss and every LoRA gradient equal those of one image pass
    per row."""
    path = request.getfixturevalue(fixture)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    torch.manual_seed(0)
    model = load_model(ModelArguments(model_name_or_path=str(path)), LoraArguments(lora_dropout=0.0), config, family)
    model.eval()
    for name, parameter in model.named_parameters():  # LoRA B starts at zero; make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    _, _, layout, _ = setup(path)
    processor = AutoProcessor.from_pretrained(path)
    order = [1, 0, 0, 1]
    rows = [{"image": IMAGES[i], "caption": CAPTIONS[row % 2], "image_index": i} for row, i in enumerate(order)]
    plain = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(rows)
    grouped = CaptionCollator(processor.image_processor, processor.tokenizer, layout, group_images=True)(rows)
    assert grouped["image_group"].tolist() == [0, 1, 1, 0] and grouped["image_grid_thw"].shape[0] == 2

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        group = batch.pop("image_group", None)
        if group is None:
            loss = model(**batch).loss
        else:
            with shared_image_features(model, batch, group, layout, image_feature_module(model, family)) as batch:
                assert torch.equal(batch["image_grid_thw"], plain["image_grid_thw"])  # per row again
                loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(plain)
    grouped_loss, grouped_grads = loss_and_grads(grouped)
    torch.testing.assert_close(grouped_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert all(grad.abs().sum() > 0 for grad in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(grouped_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- --min_pixels / --max_pixels ------------------------------------------------------------------------------------


@both
@pytest.mark.parametrize(
    ("min_tokens", "max_tokens", "pixel_range", "expected"),
    [
        (None, None, (4, 256), 50),  # the defaults: the image's own 10 x 5 tokens
        (None, 10, (4, 10), 8),  # scaled down by sqrt(50 / 10) to 4 x 2 tokens
        (None, 2, (2, 2), 2),  # the default minimum is at most the maximum given
        (200, None, (200, 256), 200),  # scaled up by 2 to 20 x 10 tokens
        (300, None, (300, 300), 325),  # the default maximum is at least the minimum; sides rounded up, 13 x 25
    ],
)
def test_pixel_flags_set_the_number_of_image_tokens(
    request, fixture, min_tokens, max_tokens, pixel_range, expected, tmp_path
):
    """In visual tokens' worth of pixels (one token: (patch_size * merge_size)^2 pixels)."""
    path = request.getfixturevalue(fixture)
    processor, family, _, _ = setup(path)
    side = {"tiny_qwen2_5_vl": 28, "tiny_qwen3_vl": 32}[fixture]  # patch 14 / 16, merged 2 x 2
    token = side * side
    flags = DataArguments(
        min_pixels=None if min_tokens is None else min_tokens * token,
        max_pixels=None if max_tokens is None else max_tokens * token,
    )
    family.configure_processor(processor, flags)
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (pixel_range[0] * token, pixel_range[1] * token)
    layout = build_layout(family, AutoConfig.from_pretrained(path), processor)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout)
    image = Image.new("RGB", (10 * side, 5 * side), (20, 30, 200))
    batch = collator(generation_rows([image]))
    assert (batch["input_ids"] == layout.image_token_id).sum() == expected
    assert (chat(processor, image, DEFAULT_PROMPT)["input_ids"] == layout.image_token_id).sum() == expected
    # The saved processor (a run's output, which inference and the card's snippet load) keeps the range.
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).image_processor.size == size


@both
def test_a_continued_run_keeps_the_pixel_range_its_processor_was_saved_with(request, fixture, tmp_path):
    """SCST from a run trained with --max_pixels: a flag not given again keeps the run's range (the images are seen
    as in stage 1); a flag given overrides it; a checkpoint that is not a run's output gets the defaults."""
    path = request.getfixturevalue(fixture)
    processor, family, _, _ = setup(path)
    side = {"tiny_qwen2_5_vl": 28, "tiny_qwen3_vl": 32}[fixture]
    token = side * side
    family.configure_processor(processor, DataArguments(min_pixels=2 * token, max_pixels=9 * token))
    run = tmp_path / "run"
    processor.save_pretrained(run)
    model_args = ModelArguments(model_name_or_path=str(run))
    assert not saved_by_a_run(model_args)
    (run / CAPTIONING_CONFIG).write_text("{}")  # what makes a folder a run's output
    assert saved_by_a_run(model_args) and not saved_by_a_run(ModelArguments(model_name_or_path=str(path)))

    def pixel_range(flags: DataArguments, from_run: bool) -> tuple[int, int]:
        continued = load_processor(model_args)
        family.configure_processor(continued, flags, from_run=from_run)
        return continued.image_processor.size["shortest_edge"], continued.image_processor.size["longest_edge"]

    assert pixel_range(DataArguments(), from_run=True) == (2 * token, 9 * token)
    assert pixel_range(DataArguments(max_pixels=16 * token), from_run=True) == (2 * token, 16 * token)
    assert pixel_range(DataArguments(max_pixels=token), from_run=True) == (token, token)
    assert pixel_range(DataArguments(), from_run=False) == (4 * token, 256 * token)


@both
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"min_pixels": 100}, r"--min_pixels 100 is less than one visual token of Qwen[\d.]+-VL \((\d+) x \1 = "),
        ({"max_pixels": 100}, r"--max_pixels 100 is less than one visual token of Qwen[\d.]+-VL"),
        ({"min_pixels": 20000, "max_pixels": 10000}, r"--min_pixels 20000 is more than --max_pixels 10000"),
    ],
)
def test_unusable_pixel_flags_are_refused_naming_the_flag(request, fixture, flags, message):
    processor, family, _, _ = setup(request.getfixturevalue(fixture))
    with pytest.raises(ValueError, match=message):
        family.configure_processor(processor, DataArguments(**flags))


# --- loss, the first generated token and batched generation ---------------------------------------------------------


@both
def test_loss_is_next_token_cross_entropy_over_the_answer(request, fixture):
    path = request.getfixturevalue(fixture)
    _, family, _, collator = setup(path)
    model = family.model_class.from_pretrained(path).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows())


@both
def test_first_generated_token_is_what_training_teaches_at_the_last_prompt_position(request, fixture):
    """Prompts differ in length (their images' tokens): each training row (right-padded) starts with its image's
    generation prompt (left-padded in the generation batch), its first caption token is a label right after it,
    and generate's first new token and logits are the teacher-forced prediction from the prompt's last position."""
    path = request.getfixturevalue(fixture)
    _, family, _, collator = setup(path)
    model = sharpen(family.model_class.from_pretrained(path).eval())
    training, prompt = collator(training_rows()), collator(generation_rows())
    with torch.no_grad():
        teacher_forced = model(**training).logits
        generated = model.generate(
            **generation_inputs(prompt),
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    width = prompt["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, :width], prompt["input_ids"])
    lengths = prompt["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] != lengths[1]
    for row, length in enumerate(lengths):
        assert training["input_ids"][row, :length].tolist() == prompt["input_ids"][row, width - length :].tolist()
        assert training["labels"][row, length] != IGNORE_INDEX
        assert generated.sequences[row, width] == teacher_forced[row, length - 1].argmax()
        torch.testing.assert_close(generated.logits[0][row], teacher_forced[row, length - 1], atol=1e-4, rtol=0)


@both
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_captions_each_image_as_alone(request, fixture, num_beams):
    """Two images of different sizes, left-padded together: each gets the caption it gets alone (greedy and beam
    search, which repeats each image's patches and grid with its beams)."""
    path = request.getfixturevalue(fixture)
    _, family, layout, collator = setup(path)
    model = sharpen(family.model_class.from_pretrained(path).eval())
    settings = dict(num_beams=num_beams, max_new_tokens=5, do_sample=False)

    def captions(images):
        batch = collator(generation_rows(images))
        with torch.no_grad():
            sequences = model.generate(**generation_inputs(batch), **settings)
        return layout.caption_tokens(sequences, batch["input_ids"]).tolist()

    batched = captions(IMAGES)
    alone = [captions([image])[0] for image in IMAGES]
    assert batched[0] != batched[1]  # the two images get different captions
    pad = model.generation_config.pad_token_id
    for row, single in enumerate(alone):
        assert batched[row][: len(single)] == single and set(batched[row][len(single) :]) <= {pad}


# --- end to end: main() ---------------------------------------------------------------------------------------------

SHAPES = [(60, 30), (120, 40), (40, 90), (80, 80)]  # 2, 4, 3 and 9 (Qwen2.5-VL) / 4 (Qwen3-VL) visual tokens


def run_card_snippet(code: str, image_path: Path) -> str:
    code = re.sub(r"^image_path = .*$", f"image_path = {json.dumps(str(image_path))}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace["caption"]


@pytest.fixture(scope="module")
def shaped_caption_folder(tmp_path_factory) -> Path:
    """The tests' caption folder with images of four shapes (plain colours), so that batches mix token counts."""
    root = make_caption_folder(tmp_path_factory.mktemp("qwen-captions"))
    for i, path in enumerate(sorted(root.glob("img_*.png"))):
        with Image.open(path) as image:
            image.convert("RGB").resize(SHAPES[i % len(SHAPES)]).save(path)
    return root


@pytest.mark.slow
@both
def test_lora_run_trains_evaluates_predicts_and_its_card_and_caption_images_reproduce_the_predictions(
    request, fixture, shaped_caption_folder, tmp_path
):
    path = request.getfixturevalue(fixture)
    family = FAMILIES[fixture]
    token = {"tiny_qwen2_5_vl": 28 * 28, "tiny_qwen3_vl": 32 * 32}[fixture]
    output = tmp_path / "out"
    argv = tiny_run_argv(
        path,
        shaped_caption_folder,
        output,
        eval_baseline=True,
        learning_rate=1e-2,
        max_new_tokens=6,
        min_pixels=token,
        max_pixels=16 * token,
    )
    results = main(argv)
    for phase, prefix in (("baseline", "eval"), ("eval", "eval"), ("predict", "test")):
        for key in ("bleu_4", "rouge_l", "cider", "loss"):
            assert f"{prefix}_{key}" in results[phase], (phase, key)
    assert results["train"]["train_loss"] > 0
    assert results["eval"]["eval_loss"] < results["baseline"]["eval_loss"]
    settings = json.loads((output / "captioning_config.json").read_text())
    assert settings["family"] == family.name and settings["caption_prompt"] == DEFAULT_PROMPT
    size = AutoProcessor.from_pretrained(output).image_processor.size  # the run's pixel range, saved
    assert (size["shortest_edge"], size["longest_edge"]) == (token, 16 * token)
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["target_modules"] and all("language_model" in name for name in adapter["target_modules"])
    lines = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    predictions = {line["image"]: line["prediction"] for line in lines}
    assert len(predictions) == 3 and all(isinstance(caption, str) for caption in predictions.values())
    card = (output / "README.md").read_text()
    assert family.name in ModelCard(card).data.tags and family.model_class.__name__ in card
    code = explicit_snippet(card)
    for image, prediction in list(predictions.items())[:2]:
        assert run_card_snippet(code, shaped_caption_folder / image) == prediction
    # caption_images.py (captioning/inference.py's Captioner on the run's folder), all test images in one batch.
    captions_file = tmp_path / "captions.jsonl"
    images = [str(shaped_caption_folder / image) for image in predictions]
    caption_images.main(["--model", str(output), "--images", *images, "--output", str(captions_file)])
    written = [json.loads(row) for row in captions_file.read_text().splitlines()]
    assert {Path(row["image"]).name: row["caption"] for row in written} == predictions
